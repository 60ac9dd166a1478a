"""What the page draws, from flows: workloads by cluster, namespace and app; edges counted by verdict with the drop
reasons; replies not drawn as edges of their own; the table's rows."""

from __future__ import annotations

from typing import Any

from clustermesh.ui.graph import flow_row, graph


def side(cluster: str, app: str | None, pod: str = "p", namespace: str = "shop") -> dict[str, Any]:
    labels = [f"k8s:io.cilium.k8s.policy.cluster={cluster}"] + ([f"k8s:app={app}"] if app else [])
    return {"cluster_name": cluster, "namespace": namespace, "pod_name": pod, "labels": labels}


def flow(source: dict[str, Any], destination: dict[str, Any], verdict: str = "FORWARDED", **extra: Any) -> dict:
    body = {"verdict": verdict, "IP": {"source": "10.1.1.10", "destination": "10.2.1.10"}, "source": source,
            "destination": destination, "l4": {"TCP": {"destination_port": 8080}}, **extra}  # fmt: skip
    return {"flow": body, "node_name": "c2/n1", "time": "2026-12-07T10:00:00Z"}


def test_edges_between_workloads_count_verdicts_and_name_drop_reasons() -> None:
    client, server = side("c2", "client"), side("c1", "server")
    documents = [
        flow(client, server),
        flow(client, server, "DROPPED", drop_reason_desc="POLICY_DENIED"),
        flow(client, side("c1", "server", pod="other")),  # another pod of the same workload
        flow(server, client, is_reply=True),
    ]
    drawn = graph(documents, ["c1", "c2", "c3"])
    assert drawn["clusters"] == ["c1", "c2", "c3"], "every cluster gets its column, even one with no flow"
    assert [n["id"] for n in drawn["nodes"]] == ["c1/shop/app=server", "c2/shop/app=client"]
    [edge] = drawn["edges"]
    assert edge == {"source": "c2/shop/app=client", "destination": "c1/shop/app=server", "forwarded": 2,
                    "dropped": 1, "reasons": ["POLICY_DENIED"]}  # fmt: skip


def test_an_endpoint_without_an_app_label_is_its_pod_or_reserved_label_or_address() -> None:
    world = {"labels": ["reserved:world"]}
    documents = [flow(side("c1", None, pod="db-0"), world)]
    assert [n["id"] for n in graph(documents)["nodes"]] == ["?/-/reserved:world", "c1/shop/db-0"]
    row = flow_row(documents[0])
    assert (row["source"], row["destination"], row["port"], row["protocol"]) == (
        "c1/shop/db-0", "?/-/reserved:world", 8080, "TCP")  # fmt: skip


def test_a_service_is_a_node_between_its_clients_and_the_backends_chosen_in_any_cluster() -> None:
    client = side("c1", "client")
    translated = {"frontend": "10.96.1.20:80", "name": "shop/server", "backend": "10.2.1.10:8080",
                  "backend_cluster": "c2"}  # fmt: skip
    documents = [
        flow(client, side("c2", "server"), "TRANSLATED", Type="SOCK", service=translated),
        flow(client, side("c3", "server"), "TRANSLATED", Type="SOCK", service=translated | {"backend_cluster": "c3"}),
        flow(
            client,
            {},
            "DROPPED",
            Type="SOCK",
            drop_reason_desc="NO_SERVICE",
            service={"frontend": "10.96.1.21:80", "name": "shop/empty"},
        ),
    ]
    drawn = graph(documents)
    kinds = {n["id"]: n.get("kind", "workload") for n in drawn["nodes"]}
    assert kinds["c1/svc/shop/server"] == "service" and kinds["c1/svc/shop/empty"] == "service"
    edges = {(e["source"], e["destination"]): e for e in drawn["edges"]}
    assert edges[("c1/shop/app=client", "c1/svc/shop/server")]["forwarded"] == 2
    assert edges[("c1/svc/shop/server", "c2/shop/app=server")]["forwarded"] == 1
    assert edges[("c1/svc/shop/server", "c3/shop/app=server")]["forwarded"] == 1
    empty = edges[("c1/shop/app=client", "c1/svc/shop/empty")]
    assert empty["dropped"] == 1 and empty["reasons"] == ["NO_SERVICE"]
    assert not any(source == "c1/svc/shop/empty" for source, _ in edges), "no backend: no edge onwards"
