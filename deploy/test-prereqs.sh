#!/usr/bin/env bash
# What `make test` needs besides the venv:
# 1. a Redis answering on 127.0.0.1:6379: use one that is running, else start one (installing
#    Debian's redis-server first when we are root and it is missing), else say how;
# 2. a compose client, so the compose file is checked by `docker compose config` too: when neither
#    `docker compose` nor `docker-compose` is here and we are root on Debian, install Debian's
#    docker-compose (it validates the file without a Docker daemon). Without it that one test skips;
# 3. a `prometheus` binary, so every dashboard query is run by a real Prometheus: Debian's package
#    when we are root on Debian (only the binary is used; the test starts its own). Without it that
#    one test skips, loudly.
set -euo pipefail
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
if ! command -v prometheus >/dev/null && can_apt; then
  echo "no prometheus: installing Debian's prometheus to check the dashboard's queries" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
    || echo "could not install prometheus; the dashboard query test will skip" >&2
fi
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null && can_apt; then
  echo "no compose client: installing Debian's docker-compose to validate docker-compose.yml" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
    || echo "could not install docker-compose; the compose client check will skip" >&2
fi
ping() { python3 - <<'PY'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", 6379), timeout=1); s.sendall(b"PING\r\n")
    sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}
ping && exit 0
if ! command -v redis-server >/dev/null; then
  if can_apt; then
    echo "redis-server not found: installing Debian's redis-server" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "No Redis on 127.0.0.1:6379 and no redis-server to start. Install one (e.g. 'sudo apt-get install redis-server')" >&2
    echo "or run 'docker run -d -p 6379:6379 redis:7', then rerun 'make test'." >&2
    exit 1
  fi
fi
echo "starting redis-server on 127.0.0.1:6379 (no persistence) for the tests" >&2
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp --logfile /tmp/holorec-test-redis.log
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "redis-server did not answer on 127.0.0.1:6379; see /tmp/holorec-test-redis.log" >&2
exit 1
