#!/bin/sh
# The container's first process: starts hsmsignd with the arguments it was given, passes
# SIGTERM, SIGINT and SIGHUP on to it, and exits with its exit status.
#
# Exit 77 means the token refused the PIN (incorrect, locked or expired). Kubernetes restarts
# a container whatever its exit status, and every restart would present the refused PIN
# again until the HSM locks the user. So after a 77 this script leaves a marker in
# $HSMSIGND_STATE_DIR (an emptyDir: it lives as long as the pod, across container restarts)
# and, while the marker is there, exits 77 again without starting hsmsignd. Fix the PIN
# Secret, then replace the pod (kubectl rollout restart): a new pod has no marker.
set -u
state_dir=${HSMSIGND_STATE_DIR:-/var/lib/hsmsign/state}
marker="$state_dir/pin-refused"
if [ -e "$marker" ]; then
    echo "hsmsignd: the token refused the PIN earlier in this pod ($marker); not trying it" \
        "again: correct the PIN Secret, then replace the pod" >&2
    exit 77
fi
hsmsignd "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM
trap 'kill -INT "$child" 2>/dev/null' INT
trap 'kill -HUP "$child" 2>/dev/null' HUP
# wait returns early (above 128) when a trapped signal arrives: wait again while the child
# is still there.
while :; do
    wait "$child"
    status=$?
    if [ "$status" -le 128 ] || ! kill -0 "$child" 2>/dev/null; then
        break
    fi
done
if [ "$status" -eq 77 ]; then
    if mkdir -p "$state_dir" && : >"$marker"; then
        echo "hsmsignd: PIN refused; $marker keeps this pod from trying it again" >&2
    else
        echo "hsmsignd: PIN refused, and $marker could not be written: mount a writable" \
            "volume at $state_dir, or a restart will present the PIN again" >&2
    fi
fi
exit "$status"
