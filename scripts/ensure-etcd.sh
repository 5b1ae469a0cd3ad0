#!/bin/sh
# Before `npm test`: the etcd tests start their own etcd clusters (etcd 3.4+, etcdctl) and make
# throwaway TLS certificates with openssl. Installs whatever is missing from Debian's packages
# when run as root (as CI does); otherwise says what to install.
set -eu
missing=""
command -v etcd >/dev/null 2>&1 || missing="$missing etcd-server"
command -v etcdctl >/dev/null 2>&1 || missing="$missing etcd-client"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y $missing
  exit 0
fi
echo "npm test needs:$missing (Debian/Ubuntu: sudo apt-get install -y$missing; macOS: brew install etcd openssl)" >&2
exit 1
