#!/usr/bin/env bash
# Install the Debian packages the project needs. Idempotent: when everything is there it only runs `dpkg-query`.
# Run as root (or through sudo). Called by `make setup`.
set -euo pipefail

# Packages from the main suite (bookworm). --no-install-recommends: wireguard-tools, for one, recommends a kernel.
PACKAGES=(
  etcd-server     # the kvstore of every cluster
  etcd-client     # etcdctl, for people looking at a cluster's state
  ca-certificates
  iproute2        # ip, for the lab's namespaces and the datapath
  iputils-ping    # ping, inside lab pods
  curl            # HTTP from inside lab pods (e2e tests, users)
  wireguard-tools # wg, to configure WireGuard interfaces
  iperf3          # bench/datapath.py
  tcpdump         # e2e tests look at the underlay for clear text
  util-linux      # nsenter, unshare: the lab enters namespaces, charon runs with a private /run
  strongswan-charon              # charon, the IKEv2 daemon of the ipsec routing mode
  libcharon-extra-plugins        # kernel-libipsec: ESP in user space (these kernels have no ESP)
  libstrongswan-standard-plugins # openssl (x25519, AES-GCM) and gcm plugins
  strongswan-swanctl             # swanctl and the vici plugin, to look at and drive charon
  clang           # compiles bpf/ (C with BTF maps) into eBPF objects
  llvm            # llvm-strip, llvm-objdump, for those objects
  libbpf-dev      # bpf/bpf_helpers.h and friends, for compiling bpf/
  linux-libc-dev  # linux/bpf.h and the kernel's UAPI headers
  bpftool         # loads the objects, pins their programs and maps
  nftables        # bench/policy.py: the nftables baseline of a policy
  chromium        # the browser test of `clustermesh ui` (headless)
  chromium-driver # chromedriver, through which Selenium drives it
  shellcheck      # checks the shell scripts (the CNI plugin of nodes without Python, scripts/)
)
# From bookworm-backports (Debian's own archive): wireguard-go 0.0.20231211 has UDP GSO/GRO and TUN offloads, about
# 5x the throughput of bookworm's 0.0.20220316 on these machines (DESIGN section 8).
BACKPORTS=(
  wireguard-go
)

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]; }
missing=()
for pkg in "${PACKAGES[@]}"; do installed "$pkg" || missing+=("$pkg"); done
missing_backports=()
for pkg in "${BACKPORTS[@]}"; do
  # the backports version is the one we want: an older wireguard-go from bookworm counts as missing
  installed "$pkg" && dpkg-query -W -f='${Version}' "$pkg" | grep -q bpo || missing_backports+=("$pkg")
done

# `localhost` must resolve: chromedriver (the browser test) talks to Chromium through it. A minimal Debian root
# (debootstrap) has no /etc/hosts at all; a machine that has one keeps it untouched.
if ! getent hosts localhost >/dev/null 2>&1; then
  echo "setup: /etc/hosts does not name localhost: adding Debian's default lines"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' | \
    { if [ "$(id -u)" -eq 0 ]; then tee -a /etc/hosts; else sudo tee -a /etc/hosts; fi; } >/dev/null
fi

if [ ${#missing[@]} -eq 0 ] && [ ${#missing_backports[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "setup: need root to install ${missing[*]} (run as root or install sudo)" >&2; exit 1
  fi
fi

echo "setup: installing Debian packages: ${missing[*]} ${missing_backports[*]}"
export DEBIAN_FRONTEND=noninteractive
# Debian's etcd-server ships a service that would start a plaintext etcd on 2379: never start services here.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod +x "$policy" && created_policy=1
fi
trap '[ $created_policy -eq 1 ] && $SUDO rm -f "$policy"' EXIT
if [ ${#missing_backports[@]} -gt 0 ]; then
  backports=/etc/apt/sources.list.d/clustermesh-backports.sources
  if [ ! -e "$backports" ]; then
    # The same archive as the system's own sources, suite bookworm-backports; nothing else is taken from it.
    # Debian's own file first: another *.sources may be a third party's archive, without bookworm-backports.
    mirror=$(grep -ohP '^URIs:\s*\K\S+' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1 || true)
    [ -n "$mirror" ] || mirror=$(grep -ohP '^URIs:\s*\K\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
    [ -n "$mirror" ] || mirror=$(grep -m1 -oP '^deb\s+(\[[^]]*\]\s+)?\K\S+' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$mirror" | $SUDO tee "$backports" >/dev/null
  fi
fi
$SUDO apt-get update -q >/dev/null
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ${#missing_backports[@]} -gt 0 ]; then
  $SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports "${missing_backports[@]}" >/dev/null
fi
echo "setup: Debian packages installed"
