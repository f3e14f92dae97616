# Sourced by the bench scripts.
#
# wait_port PORT [TRIES] waits until something
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

# wait_time_wait [MAX] waits (up to 70 s) until the kernel holds at most MAX
# (default 20,000) TCP connections in TIME_WAIT. Runs of 19,000 connections back
# to back leave ~40,000 each for 60 s, and with ~90,000 of them the next run's
# 19,000 connects took 8-13 s instead of 2 (floor and Hubbub alike, 2026-12-04):
# the join time measured the previous run, not the server.
wait_time_wait() {
  local max=${1:-20000} n
  for _ in $(seq 70); do
    n=$(ss -tan state time-wait 2>/dev/null | wc -l)
    [ "$n" -le "$max" ] && return 0
    sleep 1
  done
  echo "still $n connections in TIME_WAIT after 70 s; measuring anyway" >&2
}
