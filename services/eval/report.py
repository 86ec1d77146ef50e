"""The report directory of `imsearch eval`: metrics.json, summary.md/.html, per-class table, plots."""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from services.common.plots import pyplot
from services.common.store import read_uri
from services.eval.protocols import ClassesResult, CopyResult

THUMB = 96
GALLERY_ROWS = 6
GALLERY_K = 6


def thumbnail(src: bytes | str, mark: str | None = None) -> Image.Image:
    """A THUMB x THUMB tile; mark 'good'/'bad' draws a green/red frame."""
    try:
        img = Image.open(io.BytesIO(src if isinstance(src, bytes) else read_uri(src))).convert("RGB")
        img = ImageOps.pad(img, (THUMB, THUMB), color=(255, 255, 255))
    except Exception:  # noqa: BLE001 - a missing or unreadable thumbnail must not sink the report
        img = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
    if mark:
        ImageDraw.Draw(img).rectangle((0, 0, THUMB - 1, THUMB - 1), outline=(0, 160, 0) if mark == "good"
                                      else (220, 0, 0), width=4)
    return img


def gallery(rows: list[tuple[bytes | str, list[tuple[str, bool]]]], path: Path) -> None:
    """Each row: the query, then its top results framed green (relevant) or red."""
    pad = 4
    sheet = Image.new("RGB", ((GALLERY_K + 1) * (THUMB + pad) + pad * 3, len(rows) * (THUMB + pad) + pad),
                      (255, 255, 255))
    for r, (query, hits) in enumerate(rows):
        y = pad + r * (THUMB + pad)
        sheet.paste(thumbnail(query), (pad, y))
        for j, (uri, ok) in enumerate(hits[:GALLERY_K]):
            sheet.paste(thumbnail(uri, "good" if ok else "bad"), (pad * 4 + (j + 1) * (THUMB + pad), y))
    sheet.save(path)


def embedding_plots(vectors: np.ndarray, labels: list[str], out: Path) -> list[str]:
    """t-SNE and UMAP of the embeddings coloured by label; returns the files written."""
    from sklearn.manifold import TSNE

    plt = pyplot()
    classes = sorted(set(labels))
    colour = np.array([classes.index(lab) for lab in labels])
    perplexity = float(min(30, max(2, len(vectors) // 4)))
    layouts = {"tsne.png": ("t-SNE", TSNE(perplexity=perplexity, init="pca", random_state=0).fit_transform(vectors))}
    try:
        import umap

        reducer = umap.UMAP(n_neighbors=min(15, len(vectors) - 1), random_state=0, n_jobs=1)
        layouts["umap.png"] = ("UMAP", reducer.fit_transform(vectors))
    except ImportError:
        pass  # umap-learn is optional for library users; the CLI's install includes it
    for name, (title, xy) in layouts.items():
        fig, ax = plt.subplots(figsize=(10, 7))
        ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap="tab20", s=14)
        if len(classes) <= 20:
            for i, c in enumerate(classes):
                ax.scatter([], [], color=plt.get_cmap("tab20")(i / max(1, len(classes) - 1)), label=c, s=14)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=1.2)
        ax.set_title(f"{title} of {len(vectors)} embeddings, {len(classes)} classes")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return list(layouts)


def pr_plot(levels: np.ndarray, curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for curve in curves.values():
        ax.plot(levels, curve, color="grey", alpha=0.35, linewidth=0.8)
    mean = np.mean(list(curves.values()), axis=0)
    ax.plot(levels, mean, color="C0", linewidth=2.5, label=f"mean over {len(curves)} classes")
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    head = list(rows[0])
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(c) + " |" for c in cells])


def write_summary(out: Path, title: str, sections: list[tuple[str, str]], images: list[str]) -> None:
    md = [f"# {title}", ""] + [f"## {h}\n\n{body}\n" for h, body in sections]
    md += [f"![{name}]({name})" for name in images]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    body = "".join(f"<h2>{html.escape(h)}</h2><pre>{html.escape(b)}</pre>" for h, b in sections)
    body += "".join(f'<figure><img src="{n}" style="max-width:100%"><figcaption>{n}</figcaption></figure>'
                    for n in images)
    (out / "summary.html").write_text(f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
                                      f"<h1>{html.escape(title)}</h1>{body}")


def metrics_rows(metrics: dict) -> list[dict]:
    return [{"metric": k, "value": v} for k, v in metrics.items()]


def classes_report(result: ClassesResult, out: Path, title: str, extra: dict | None = None,
                   step: Callable[[str], None] = lambda msg: None, plots: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": result.metrics, "exact": result.exact_metrics, "per_class": result.per_class,
               **(extra or {})}
    (out / "metrics.json").write_text(json.dumps(payload, indent=1))
    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.per_class[0]))
        writer.writeheader()
        writer.writerows(result.per_class)
    step(f"writing the report to {out}: precision-recall curves")
    pr_plot(result.pr_levels, result.pr_by_class, out / "pr_curves.png", "precision-recall per class (grey)")
    images = ["pr_curves.png"]
    if plots:
        step(f"t-SNE and UMAP maps of {len(result.vectors)} vectors (the slow part of the report)")
        images += embedding_plots(result.vectors, result.labels, out)
    step("galleries of the best and worst queries")
    label_of = dict(zip(result.uris, result.labels))
    order = np.argsort(np.nan_to_num(result.ap, nan=2.0))  # NaN (no relevant item) not among the worst
    for name, picks in (("gallery_worst.png", order[:GALLERY_ROWS]),
                        ("gallery_best.png", order[::-1][np.isfinite(result.ap[order[::-1]])][:GALLERY_ROWS])):
        gallery([(result.uris[q], [(u, label_of.get(u) == result.labels[q]) for u in result.ranked.uris[q]])
                 for q in picks], out / name)
        images.append(name)
    sections = [("metrics (index)", table(metrics_rows(result.metrics)))]
    if result.exact_metrics:
        sections.append(("metrics (exact search, same embeddings)", table(metrics_rows(result.exact_metrics))))
    sections.append(("per class (1-NN precision/recall/F1, mean AP)", table(result.per_class)))
    write_summary(out, title, sections, images)


def copydetect_report(result: CopyResult, out: Path, title: str, extra: dict | None = None,
                      step: Callable[[str], None] = lambda msg: None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    step(f"writing the report to {out}: galleries of found and missed copies")
    (out / "metrics.json").write_text(json.dumps({"metrics": result.metrics, "recall@1_by_edit": result.by_edit,
                                                  **(extra or {})}, indent=1))
    copies = [i for i, q in enumerate(result.queries) if q.source]
    missed = [i for i in copies if not (len(result.ranked.uris[i]) and result.ranked.uris[i][0] ==
                                        result.queries[i].source)]
    found = [i for i in copies if i not in set(missed)]
    images = []
    for name, picks in (("gallery_worst.png", missed[:GALLERY_ROWS]), ("gallery_best.png", found[:GALLERY_ROWS])):
        if picks:
            gallery([(result.queries[q].image, [(u, u == result.queries[q].source) for u in result.ranked.uris[q]])
                     for q in picks], out / name)
            images.append(name)
    sections = [("metrics", table(metrics_rows(result.metrics))),
                ("recall@1 by edit", table([{"edit": e, "recall@1": v} for e, v in result.by_edit.items()]))]
    write_summary(out, title, sections, images)
