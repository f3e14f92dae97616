# Sourced by the bench scripts: wait_port PORT [TRIES] waits until something
# listens on 127.0.0.1:PORT, trying every 0.1 s (default 50 tries, 5 s); if nothing
# does, it says so on stderr and returns 1, so a server that failed to start is
# reported as that and not as a benchmark that found nothing to connect to.
wait_port() {
  local port=$1 tries=${2:-50}
  for _ in $(seq "$tries"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$port after $tries tries" >&2
  return 1
}
