#!/usr/bin/env bash
# The Kubernetes end to end on kind: a cluster from kind-config.yaml, the polaris image built from
# the Dockerfile and loaded into it, the chart installed, two demo apps with injected sidecars, and
# traffic checked through the mesh in each TLS mode. Needs docker, kind, kubectl and helm (our CI
# machines have no Docker: this tier runs on a developer's machine or a CI with Docker).
#
#   e2e/kind.sh            create (or reuse) the cluster, run the checks, keep the cluster
#   e2e/kind.sh --delete   and delete the cluster at the end
#
# The demo: `echo` (an HTTP server answering with its pod's name) and `client` (curl), both in
# namespace `demo` labelled polarismesh.cn/inject=enabled. Apps reach the mesh through their
# sidecar's outbound listener (127.0.0.1:15001, Host header = service name); callers reach `echo`
# at its sidecar's inbound port (15006), where its TLS mode is enforced.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=polaris-mesh
IMAGE=polaris-mesh/polaris:e2e
NS=demo
DELETE=false
[ "${1:-}" = "--delete" ] && DELETE=true

log() { echo "kind.sh: $*" >&2; }
fail() {
    log "FAILED: $*"
    kubectl -n polaris-system logs deploy/polaris-mesh --tail=50 >&2 || true
    exit 1
}
for tool in docker kind kubectl helm; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done
if $DELETE; then
    trap 'kind delete cluster --name "$CLUSTER"' EXIT
fi

if ! kind get clusters | grep -qx "$CLUSTER"; then
    log "creating the kind cluster"
    kind create cluster --config kind-config.yaml --wait 120s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

log "building $IMAGE and loading it into the cluster"
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "installing the chart"
helm upgrade --install polaris-mesh charts/polaris-mesh --namespace polaris-system --create-namespace \
    --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
    --set persistence.enabled=false --wait --timeout 5m
kubectl -n polaris-system rollout status deploy/polaris-mesh --timeout 3m

log "deploying the demo apps"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$NS" polarismesh.cn/inject=enabled --overwrite
kubectl -n "$NS" apply -f - <<'YAML'
apiVersion: v1
kind: ServiceAccount
metadata: {name: echo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo, version: v1}}
    spec:
      serviceAccountName: echo
      containers:
        - name: echo
          image: python:3.12-alpine
          command: ["python", "-c"]
          args:
            - |
              import http.server, os
              class H(http.server.BaseHTTPRequestHandler):
                  def do_GET(self):
                      body = os.environ["HOSTNAME"].encode()
                      self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
                      self.wfile.write(body)
              http.server.ThreadingHTTPServer(("127.0.0.1", 8080), H).serve_forever()
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client}
spec:
  replicas: 1
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      serviceAccountName: client
      containers:
        - name: client
          image: curlimages/curl:8.11.1
          command: ["sleep", "infinity"]
          ports: [{containerPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: client}
spec:
  selector: {app: client}
  ports: [{name: http, port: 9000, targetPort: 9000}]
YAML
kubectl -n "$NS" rollout status deploy/echo --timeout 3m
kubectl -n "$NS" rollout status deploy/client --timeout 3m

containers=$(kubectl -n "$NS" get pod -l app=echo -o jsonpath='{.items[0].spec.containers[*].name}')
[[ "$containers" == *envoy* && "$containers" == *polaris-agent* ]] || fail "echo was not injected: $containers"

# Through the client's sidecar: Host picks the service; the answer is an echo pod's name.
through_mesh() {
    kubectl -n "$NS" exec deploy/client -c client -- \
        curl -sS --max-time 5 -H "Host: echo.$NS" http://127.0.0.1:15001/
}
# Around the mesh: plaintext straight to an echo pod's sidecar inbound port.
around_mesh() {
    local ip
    ip=$(kubectl -n "$NS" get pod -l app=echo -o jsonpath='{.items[0].status.podIP}')
    kubectl -n "$NS" exec deploy/client -c client -- curl -sS --max-time 5 "http://$ip:15006/"
}
# Retries until `$@` succeeds (or, with ! first, fails) for 3 checks in a row, 60 s at most.
settle() {
    local want=ok ok=0
    if [ "$1" = "!" ]; then want=fail; shift; fi
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then got=ok; else got=fail; fi
        if [ "$got" = "$want" ]; then ok=$((ok + 1)); else ok=0; fi
        [ "$ok" -ge 3 ] && return 0
        sleep 1
    done
    return 1
}

for mode in none permissive strict; do
    log "tls-mode=$mode"
    kubectl -n "$NS" label service echo polarismesh.cn/tls-mode="$mode" --overwrite
    settle through_mesh || fail "$mode: no traffic through the mesh"
    answer=$(through_mesh)
    [[ "$answer" == echo-* ]] || fail "$mode: answered by '$answer'"
    case "$mode" in
    strict) settle ! around_mesh || fail "strict: plaintext around the mesh was answered" ;;
    *) settle around_mesh || fail "$mode: plaintext to the inbound port was refused" ;;
    esac
done

# Both echo pods answer (load balancing over the synced EndpointSlice).
seen=$(for _ in $(seq 1 20); do through_mesh; echo; done | sort -u | wc -l)
[ "$seen" -eq 2 ] || fail "expected both echo pods to answer, saw $seen"

log "passed: injection, sync, traffic through the mesh, TLS modes none, permissive and strict"
