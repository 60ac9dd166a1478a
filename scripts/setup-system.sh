#!/usr/bin/env bash
# Install the Debian packages the project needs. Idempotent: when everything is there it only runs `dpkg-query`.
# Run as root (or through sudo). Called by `make setup`.
set -euo pipefail

# Packages from the main suite (bookworm). --no-install-recommends: wireguard-tools, for one, recommends a kernel.
PACKAGES=(
  etcd-server     # the kvstore of every cluster
  etcd-client     # etcdctl, for people looking at a cluster's state
  ca-certificates
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "setup: need root to install ${missing[*]} (run as root or install sudo)" >&2; exit 1
  fi
fi

echo "setup: installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Debian's etcd-server ships a service that would start a plaintext etcd on 2379: never start services here.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod +x "$policy" && created_policy=1
fi
trap '[ $created_policy -eq 1 ] && $SUDO rm -f "$policy"' EXIT
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: Debian packages installed"
