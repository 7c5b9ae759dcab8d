#!/usr/bin/env bash
# Installs what the demo and the tests need and a fresh Debian machine lacks: nginx, curl and
# unshare (util-linux); podman, runc and mmdebstrap for the image; kubectl and
# kubernetes-validate for deploy/kubernetes. Does nothing when everything is there already.
#
# `scripts/install-deps.sh demo`: only what the demo needs, nginx and curl.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v curl >/dev/null || need+=(curl)
if [ "${1:-}" = demo ]; then
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
  fi
  exit 0
fi
command -v unshare >/dev/null || need+=(util-linux)
# tests/image.rs brings up loopback in the network namespace it runs the image in.
command -v ip >/dev/null || need+=(iproute2)
# tests/protocols.rs makes a self-signed certificate for its TLS servers, and proxies TCP with
# nginx's stream module, a dynamic module in Debian's nginx.
command -v openssl >/dev/null || need+=(openssl)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
# tests/podman.rs builds the image with podman and runs it with runc (named here, or apt would
# pick crun, which refuses machines with hybrid cgroups); mmdebstrap makes its Debian base image.
command -v podman >/dev/null || need+=(podman runc)
command -v runc >/dev/null || need+=(runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
# deploy/kubernetes (tests/kubernetes.rs): kubectl renders the manifests with its kustomize, and
# kubernetes-validate (PyPI, through pip) checks them against the Kubernetes API schemas.
KUBERNETES_VALIDATE_VERSION=1.37.0
has_validator() { python3 -c 'import kubernetes_validate' 2>/dev/null; }
# tests/status_and_metrics.rs parses /metrics with Prometheus' own OpenMetrics parser.
PROMETHEUS_CLIENT_VERSION=0.21.1
has_parser() { python3 -c 'import prometheus_client.openmetrics.parser' 2>/dev/null; }
{ has_validator && has_parser; } || python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# Not in every Debian release: without it only tests/kubernetes.rs fails, and says why.
optional=()
command -v kubectl >/dev/null || optional+=(kubernetes-client)
if [ $((${#need[@]} + ${#optional[@]})) -gt 0 ]; then
  echo "installing: ${need[*]} ${optional[*]}" >&2
  $sudo apt-get update -q
  [ ${#need[@]} -eq 0 ] \
    || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
  [ ${#optional[@]} -eq 0 ] \
    || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${optional[@]}" \
    || echo "warning: cannot install ${optional[*]}" >&2
fi
# Debian's own Python refuses pip installs (externally managed) unless told: these are test
# tools (as root they go to /usr/local, beside Debian's packages and not over them; else to
# ~/.local).
pip_install() {
  echo "installing: $1 (pip)" >&2
  local user=()
  [ "$(id -u)" -eq 0 ] || user=(--user)
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q "${user[@]}" "$1"
}
has_parser || pip_install "prometheus-client==$PROMETHEUS_CLIENT_VERSION"
has_validator || pip_install "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
# Debian 12's kubernetes-client is kubectl 1.20, whose kustomize (v2.0.3) cannot build the
# manifests: they use `replacements` and directories in `resources` (kustomize v4.1, kubectl 1.22).
kubectl_version=$(kubectl version --client -o json 2>/dev/null | python3 -c \
  'import json, sys; v = json.load(sys.stdin)["clientVersion"]; print(v["minor"].rstrip("+"), v["gitVersion"])' \
  2>/dev/null || echo "0 none")
if [ "${kubectl_version%% *}" -lt 22 ]; then
  echo "warning: tests/kubernetes.rs needs kubectl 1.22 or later (kustomize v4.1 or later), and" \
    "kubectl here is ${kubectl_version#* }: install a current kubectl from the Kubernetes" \
    "project's packages (https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/)" >&2
fi
