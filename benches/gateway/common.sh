# Shared by run.sh and instructions.sh (sourced, not run): a temp dir and
# the processes started into PIDS, both cleaned up on exit (KEEP=1 keeps
# the dir), free ports, and waiting for a port to accept.

# make_tmp PREFIX: sets TMP and the cleanup trap.
make_tmp() {
  TMP="$(mktemp -d -t "$1.XXXXXX")"
  chmod 755 "$TMP"
  PIDS=()
  trap cleanup EXIT
}

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PORT [SECONDS]: until something accepts on PORT (default 10 s).
wait_port() {
  local port=$1 tenths=$(( ${2:-10} * 10 )) i
  for i in $(seq 1 "$tenths"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $port" >&2
  exit 1
}
