#!/usr/bin/env bash
# Creates (once) an isolated SoftHSM2 token for development: its own softhsm2.conf and token
# directory under softhsm/dev/, so nothing touches the system's /var/lib/softhsm.
# A second run reuses the token. The user PIN is random and kept in softhsm/dev/user.pin (0600);
# hsm_config/dev.toml points at it. Usage: softhsm/dev-token.sh [DIR] [LABEL]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-"$here/dev"}
label=${2:-hsmsign-dev}

command -v softhsm2-util >/dev/null || { echo "softhsm2-util not found: apt-get install softhsm2" >&2; exit 1; }
umask 077
mkdir -p "$dir/tokens"
conf="$dir/softhsm2.conf"
if [ ! -f "$conf" ]; then
  cat >"$conf" <<CONF
# SoftHSM2 configuration for hsmsign's development token (made by softhsm/dev-token.sh)
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
fi
export SOFTHSM2_CONF="$conf"

if softhsm2-util --show-slots 2>/dev/null | grep -q "Label:.*\b$label\b"; then
  echo "SoftHSM2 token '$label' already exists in $dir/tokens"
  exit 0
fi
pin=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
so_pin=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
printf '%s' "$pin" >"$dir/user.pin"
printf '%s' "$so_pin" >"$dir/so.pin"
chmod 600 "$dir/user.pin" "$dir/so.pin"
softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" >/dev/null
echo "created SoftHSM2 token '$label' in $dir/tokens (user PIN in $dir/user.pin)"
