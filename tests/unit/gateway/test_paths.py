"""Which collection a gateway path names: what a key limited to collections is checked against."""

from services.gateway.app import collection_of, path_label


def test_every_route_of_a_collection_names_it_and_the_default_routes_name_none():
    for path in ("/v1/collections/shoes", "/v1/collections/shoes/search", "/v1/collections/shoes/search/batch",
                 "/v1/collections/shoes/images/12"):
        assert collection_of(path) == "shoes", path
    for path in ("/v1/search", "/v1/search/batch", "/v1/images/12", "/v1/index", "/v1/collections/"):
        assert collection_of(path) is None, path


def test_metrics_labels_carry_no_ids_or_collection_names():
    assert path_label("/v1/images/123") == "/v1/images/{id}"
    assert path_label("/v1/collections/shoes/images/123") == "/v1/collections/{name}/images/{id}"
    assert path_label("/v1/collections/shoes/search") == "/v1/collections/{name}/search"
    assert path_label("/v1/collections/shoes") == "/v1/collections/{name}"
    assert path_label("/v1/search") == "/v1/search"
