// The search page: one query at a time (an upload, or a catalogue image by id/uri), its hits as a grid,
// relevance marks for a Rocchio re-query. Everything goes through the gateway's /v1 API.
"use strict";
const $ = (id) => document.getElementById(id);
let last = null;            // {kind: "image"|"json", file|body, label, src}
const marks = new Map();    // id -> true (relevant) / false (not relevant)

function headers() {
  const key = $("apikey").value.trim() || localStorage.getItem("imsearch-key") || "";
  if ($("apikey").value.trim()) localStorage.setItem("imsearch-key", key);
  return key ? { "Authorization": "Bearer " + key } : {};
}

async function call(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const e = body.error || {};
    throw new Error(`${response.status} ${e.code || ""}: ${e.message || response.statusText}`);
  }
  return body;
}

// The collection searched: "" is the gateway's default (its routes without a name).
const base = () => ($("collection").value ? `/v1/collections/${encodeURIComponent($("collection").value)}` : "/v1");

async function loadIndex() {
  try {
    const info = await call($("collection").value ? base() : "/v1/index");
    if (info.index_version === undefined && (info.collections || []).length) {
      // a key limited to collections: only their names come unnamed; show the first of them
      for (const name of info.collections) $("collection").append(new Option(name, name));
      $("collection").value = info.collections[0];
      $("collection-label").hidden = info.collections.length < 2;
      return loadIndex();
    }
    const fields = Object.keys(info.fields || {});
    $("index-info").textContent =
      `${info.collection ? "collection " + info.collection + " · " : ""}index ${info.index_version} · ` +
      `${info.count.toLocaleString()} images · ${info.shards.length} shard(s) · ${info.model.name}` +
      (fields.length ? ` · filterable: ${fields.join(", ")}` : "") +
      (info.query_expansion && info.query_expansion.tau !== null
        ? ` · query expansion below τ ${info.query_expansion.tau.toFixed(3)}` : "");
    const names = info.collections || [];
    if (names.length > 1 && !$("collection").options.length) {  // a picker only when there is a choice
      for (const name of names) $("collection").append(new Option(name, name));
      $("collection").value = info.collection || names[0];
      $("collection-label").hidden = false;
    }
  } catch (e) {
    $("index-info").textContent = "index unavailable: " + e.message;
  }
}

function feedback() {
  const relevant = [], notRelevant = [];
  for (const [id, ok] of marks) (ok ? relevant : notRelevant).push(id);
  return { relevant, not_relevant: notRelevant };
}

async function run(query, withFeedback = false) {
  last = query;
  if (!withFeedback) marks.clear();
  const k = parseInt($("k").value || "12", 10);
  const where = $("where").value.trim();
  const fb = withFeedback ? feedback() : { relevant: [], not_relevant: [] };
  $("error").hidden = true;
  $("status").textContent = "searching…";
  $("query-row").hidden = false;
  setQueryImage(query.src);
  try {
    let answer;
    if (query.kind === "image") {
      const form = new FormData();
      form.append("image", query.file);
      form.append("k", k);
      form.append("relevant", fb.relevant.join(","));
      form.append("not_relevant", fb.not_relevant.join(","));
      if (where) form.append("where", where);
      answer = await call(`${base()}/search`, { method: "POST", body: form });
    } else {
      answer = await call(`${base()}/search`, { method: "POST", headers: { "Content-Type": "application/json" },
                                               body: JSON.stringify({ ...query.body, k, feedback: fb,
                                                                      ...(where ? { where } : {}) }) });
    }
    show(answer, withFeedback);
  } catch (e) {
    // The error replaces the answer: no results of an earlier query stay below it, no query image.
    $("results").replaceChildren();
    $("partial").hidden = true;
    $("query-row").hidden = true;
    $("error").textContent = e.message;
    $("error").hidden = false;
  }
}

function setQueryImage(src) {
  const img = $("query-img");
  img.hidden = !src;  // a query without an image of its own (a uri) shows none until the answer names one
  if (src) img.src = src;
}

function show(answer, withFeedback) {
  if (answer.query) setQueryImage(answer.query.thumbnail);
  const coverage = Math.round(answer.coverage * 100);
  $("status").textContent = `${answer.results.length} results · ${answer.latency_ms} ms · index ${answer.index_version}` +
    ` · coverage ${coverage}%` + (answer.cached ? " · cached" : "") + (withFeedback ? " · with feedback" : "") +
    (answer.expanded ? " · query expanded" : "");
  $("partial").hidden = !answer.partial;
  $("partial").textContent = answer.partial
    ? `Partial answer: shard(s) ${answer.missing_shards.join(", ")} did not reply (coverage ${coverage}%).` : "";
  const grid = $("results");
  grid.replaceChildren(...answer.results.map(hitCard));
  $("rerun").disabled = marks.size === 0;
}

function hitCard(hit) {
  const card = document.createElement("div");
  card.className = "hit";
  const id = hit.id_str;  // a string: 64-bit ids do not fit JavaScript numbers
  card.dataset.id = id;
  const img = document.createElement("img");
  img.addEventListener("error", () => {  // an unreadable thumbnail: say so, never a broken image
    const none = document.createElement("div");
    none.className = "no-thumb";
    none.textContent = "no thumbnail";
    none.title = hit.uri;
    img.replaceWith(none);
  });
  img.src = hit.thumbnail;
  img.alt = hit.uri;
  img.title = "search by this image: " + hit.uri;
  img.addEventListener("click", () => run({ kind: "json", body: { id }, src: hit.thumbnail }));
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.innerHTML = `<span class="score">${hit.score.toFixed(4)}</span><span class="id"></span>`;
  meta.querySelector(".id").textContent = id;
  meta.querySelector(".id").title = `id ${id}\n${hit.uri}\nshard ${hit.shard}`;
  const buttons = document.createElement("div");
  buttons.className = "marks";
  for (const [label, ok, cls] of [["✓ relevant", true, "mark-yes"], ["✗ not", false, "mark-no"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = cls;
    b.textContent = label;
    b.addEventListener("click", () => mark(card, id, ok));
    buttons.append(b);
  }
  card.append(img, meta, buttons);
  paint(card, id);
  return card;
}

function mark(card, id, ok) {
  if (marks.get(id) === ok) marks.delete(id); else marks.set(id, ok);
  paint(card, id);
  $("rerun").disabled = marks.size === 0;
}

function paint(card, id) {
  card.classList.toggle("relevant", marks.get(id) === true);
  card.classList.toggle("not-relevant", marks.get(id) === false);
}

function pick(file) {
  if (!file) return;
  run({ kind: "image", file, src: URL.createObjectURL(file) });
}

$("file").addEventListener("change", (e) => pick(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files[0]); });
$("by-uri").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("uri").value.trim();
  if (!text) return;
  const body = /^\d+$/.test(text) ? { id: text } : { uri: text };  // ids stay strings (64-bit)
  run({ kind: "json", body, src: body.id !== undefined ? `${base()}/images/${body.id}` : "" });
});
$("rerun").addEventListener("click", () => last && run(last, true));
$("query-img").addEventListener("error", () => { $("query-img").hidden = true; });
$("collection").addEventListener("change", () => {  // another catalogue: its info, none of the old hits
  marks.clear();
  $("results").replaceChildren();
  $("query-row").hidden = true;
  loadIndex();
});
loadIndex();
