#!/usr/bin/env bash
# Debian packages used by integration tests (Orthanc DICOMweb server, nginx TLS proxy).
# Needs root; skipped silently when already installed.
set -euo pipefail
need=()
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc orthanc-dicomweb)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then echo "not root: cannot install ${need[*]}"; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
