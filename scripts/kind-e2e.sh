#!/usr/bin/env bash
# A mesh of kind clusters, end to end, where Docker and kind exist: create the clusters (kind-configs/), build the
# images and load them, install the chart in each cluster, connect the clusters with `clustermesh connect`, run the
# cross-cluster checks of the lab's e2e tier (reachability, a policy, a global service), then delete the clusters.
#
#   scripts/kind-e2e.sh [--clusters 2|3] [--keep] [--dry-run]
#
# --dry-run prints every command it would run (nothing needs to be installed for that); --keep leaves the clusters.
# Needs: docker, kind (v0.29.0 was the reference), kubectl, and the project's venv (make setup: clustermesh, helm).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLUSTERS=2
KEEP=0
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --clusters) CLUSTERS=${2:?--clusters needs 2 or 3}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "kind-e2e: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
case "$CLUSTERS" in
  2) SET=two-clusters ;;
  3) SET=three-clusters ;;
  *) echo "kind-e2e: --clusters takes 2 or 3, not $CLUSTERS" >&2; exit 2 ;;
esac

BIN="$ROOT/.venv/bin"
CLUSTERMESH="$BIN/clustermesh"
HELM="$BIN/helm"
TAG=0.1.0
WORK=${KIND_E2E_WORK:-$ROOT/.kind-e2e}
ROUTING=${KIND_E2E_ROUTING:-vxlan}
ETCD_PORT=2479

run() {
  # every command goes through here: printed, then run unless this is a dry run
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [ "$DRY" -eq 0 ]; then "$@"; fi
}

capture() {
  # a command whose output the script needs; a dry run prints it and answers a placeholder
  if [ "$DRY" -eq 1 ]; then
    printf '+' >&2
    printf ' %q' "$@" >&2
    printf '\n' >&2
    echo "DRY-RUN"
  else
    "$@"
  fi
}

need() {
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "kind-e2e: $tool is not installed (this script runs where Docker and kind exist; --dry-run shows the steps)" >&2
      exit 3
    fi
  done
}

if [ "$DRY" -eq 0 ]; then
  need docker kind kubectl
  if [ ! -x "$CLUSTERMESH" ] || [ ! -x "$HELM" ]; then
    echo "kind-e2e: run make setup first (the venv's clustermesh and helm)" >&2
    exit 3
  fi
fi

cleanup() {
  if [ "$KEEP" -eq 1 ]; then
    echo "kind-e2e: clusters kept (--keep): kind delete cluster --name cm-cN to remove them"
    return
  fi
  for n in $(seq 1 "$CLUSTERS"); do
    run kind delete cluster --name "cm-c$n" || true
  done
}
trap cleanup EXIT

echo "== clusters ($SET)"
for n in $(seq 1 "$CLUSTERS"); do
  run kind create cluster --name "cm-c$n" --config "$ROOT/kind-configs/$SET/cluster$n.yaml" --wait 0s
done

echo "== images"
run docker build -f "$ROOT/deploy/images/apiserver.Containerfile" -t "localhost/clustermesh-apiserver:$TAG" "$ROOT"
run docker build -f "$ROOT/deploy/images/agent.Containerfile" -t "localhost/clustermesh-agent:$TAG" "$ROOT"
for n in $(seq 1 "$CLUSTERS"); do
  run kind load docker-image --name "cm-c$n" "localhost/clustermesh-apiserver:$TAG" "localhost/clustermesh-agent:$TAG"
done

echo "== Cilium's CRDs (the kinds the mesh reads and writes), then the chart, in every cluster"
CILIUM_CRDS=https://raw.githubusercontent.com/cilium/cilium/v1.18.4/pkg/k8s/apis/cilium.io/client/crds/v2
run mkdir -p "$WORK"
for n in $(seq 1 "$CLUSTERS"); do
  ctx="kind-cm-c$n"
  for crd in ciliumnodes ciliumendpoints ciliumidentities ciliumnetworkpolicies ciliumclusterwidenetworkpolicies; do
    run kubectl --context "$ctx" apply -f "$CILIUM_CRDS/$crd.yaml"
  done
  # the control-plane node's address: the apiserver's etcd listens on it (host network), agents and peers dial it
  ip=$(capture docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "cm-c$n-control-plane")
  pki="$WORK/c$n/pki"
  run rm -rf "$WORK/c$n"
  run "$CLUSTERMESH" certs create --cluster "c$n" --dir "$pki" --server-host "$ip"
  run "$HELM" install clustermesh "$ROOT/deploy/helm/clustermesh" --kube-context "$ctx" --namespace kube-system \
    --set "cluster.name=c$n" --set "cluster.id=$n" --set "routingMode=$ROUTING" \
    --set "kvstore.endpoint=https://$ip:$ETCD_PORT" \
    --set "image.apiserver.tag=$TAG" --set "image.agent.tag=$TAG" \
    --set-file "tls.ca.cert=$pki/ca.crt" \
    --set-file "tls.server.cert=$pki/server.crt" --set-file "tls.server.key=$pki/server.key" \
    --set-file "tls.root.cert=$pki/root.crt" --set-file "tls.root.key=$pki/root.key" \
    --set-file "tls.admin.cert=$pki/admin-c$n.crt" --set-file "tls.admin.key=$pki/admin-c$n.key" \
    --set-file "tls.agent.cert=$pki/agent-c$n.crt" --set-file "tls.agent.key=$pki/agent-c$n.key" \
    --wait --timeout 5m
  # the clustermesh context of this cluster: root of its etcd, read through the kube context for ClusterMeshRemotes
  run "$CLUSTERMESH" --config "$WORK/contexts.yaml" context add "c$n" --endpoints "https://$ip:$ETCD_PORT" \
    --ca "$pki/ca.crt" --cert "$pki/root.crt" --key "$pki/root.key" --source kubernetes --kube-context "$ctx"
done

echo "== connect every pair"
for a in $(seq 1 "$CLUSTERS"); do
  for b in $(seq 1 "$CLUSTERS"); do
    [ "$a" -lt "$b" ] || continue
    run "$CLUSTERMESH" --config "$WORK/contexts.yaml" --context "c$a" connect --destination-context "c$b" \
      --allow-mismatching-ca
  done
done
for n in $(seq 1 "$CLUSTERS"); do
  run kubectl --context "kind-cm-c$n" -n kube-system rollout status daemonset/clustermesh-agent --timeout 5m
done

echo "== checks: reachability, a policy, a global service"
for n in $(seq 1 "$CLUSTERS"); do
  ctx="kind-cm-c$n"
  run kubectl --context "$ctx" create namespace shop
  run kubectl --context "$ctx" -n shop run "web-c$n" --image=registry.k8s.io/e2e-test-images/agnhost:2.53 \
    --labels=app=web -- netexec --http-port=80
  run kubectl --context "$ctx" -n shop run client --image=registry.k8s.io/e2e-test-images/agnhost:2.53 \
    --labels=app=client -- pause
  run kubectl --context "$ctx" -n shop expose pod "web-c$n" --name web --port 80 --target-port 80
  run kubectl --context "$ctx" -n shop annotate service web service.cilium.io/global=true
  run kubectl --context "$ctx" -n shop wait --for=condition=Ready pod --all --timeout 3m
done
web2=$(capture kubectl --context kind-cm-c2 -n shop get pod web-c2 -o 'jsonpath={.status.podIP}')
# 1. reachability across clusters, pod to pod
run kubectl --context kind-cm-c1 -n shop exec client -- /agnhost connect "$web2:80" --timeout 5s
# 2. a global service: every cluster's backend answers c1's client, by name
# shellcheck disable=SC2016  # expanded by the pod's shell, not this one
run kubectl --context kind-cm-c1 -n shop exec client -- sh -c \
  'for i in $(seq 1 30); do /agnhost connect web.shop.svc.cluster.local:80 --timeout 5s || exit 1; done'
# 3. a policy: c2's web accepts only clients of its own cluster; c1's client is refused from then on
run kubectl --context kind-cm-c2 apply -f - <<'POLICY'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-local-only, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.cluster: c2}}]
POLICY
if [ "$DRY" -eq 0 ]; then
  sleep 5
  if kubectl --context kind-cm-c1 -n shop exec client -- /agnhost connect "$web2:80" --timeout 5s; then
    echo "kind-e2e: FAILED: the policy did not stop c1's client" >&2
    exit 1
  fi
fi
run kubectl --context kind-cm-c1 -n kube-system exec ds/clustermesh-agent -- clustermesh status
echo "kind-e2e: passed ($CLUSTERS clusters)"
