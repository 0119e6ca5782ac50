"""The Lua scripts behind shared/jobs.py's JobStore: each is one atomic step of a job's life.

- ``SUBMIT``: answer an upload from the cache, attach it to the identical computation in flight, or
  start a new computation (job record, upload, single-flight keys, queued-bytes bound), in one step.
- ``CLAIM``: a worker starts a computation: its jobs running (those that asked for ``job.started``
  listed for the announcer), its owner, one more attempt.
- ``FINISH``: settle every attached job of a computation (done with its result, or failed), keep the
  result (the first written stands), and release the single-flight and queued-bytes bookkeeping.
- ``RECONCILE_QUEUED_BYTES``: the sweeper's recount of the uploads waiting for workers.
- ``RECONCILE_QUEUED_SHARES``: the sweeper's recount of each sender's computations in flight.

Their keys and arguments are passed by JobStore; read them beside the method that calls each.
"""

SUBMIT = """
local result_key, inflight, attached, job, image, meta =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local job_id, job_ttl, inflight_ttl, image_ttl, now, model_json, options_json, image_json, image_bytes =
  ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
if image_json == '' then image_json = redis.call('GET', meta) end
-- ARGV[19]: a result the caller read from the cache server (CACHE_URL); ARGV[20] '1': that server
-- is another one (it may evict results: the header facts live there too).
-- ARGV[21]: the most bytes of uploads that may wait for workers (0: no limit).
local given, split, max_bytes = ARGV[19], ARGV[20] == '1', tonumber(ARGV[21])
-- KEYS[14]: the request's Idempotency-Key record ('-': none), ARGV[22]: the pending claim it must
-- still hold, ARGV[23..25]: the answer to store over it when cached (200) or queued (202), its TTL.
-- The job and its key's answer are written in this one step, or neither is.
local key_name = KEYS[14]
if key_name ~= '-' and redis.call('GET', key_name) ~= ARGV[22] then
  return {'key_lost', ''}  -- its lease ran out and another request holds the key now
end
local function remember(record)
  if key_name ~= '-' then redis.call('SET', key_name, record, 'EX', tonumber(ARGV[25])) end
end
-- Fair share (KEYS[15] queued:keys, KEYS[16] queued:shares): ARGV[27] the sender's share (API key
-- or address; '' none), ARGV[28] the most computations one share may have in flight (0: no limit).
local share, share_limit = ARGV[27], tonumber(ARGV[28])
local function write_job(status, extra)
  for i = 29, #ARGV do table.insert(extra, ARGV[i]) end  -- owner, callback_url, batch_id, announce
  redis.call('HSET', job, 'id', job_id, 'status', status, 'created_at', now,
             'image', image_json, 'model', model_json, 'options', options_json, unpack(extra))
  redis.call('EXPIRE', job, job_ttl)
end
local function count(hit)  -- the accepted job, for /metrics and the admin page (ARGV[13..18])
  if ARGV[14] == '' then return end
  redis.call('HINCRBY', KEYS[10], hit and ARGV[14] or ARGV[15], 1)
  redis.call('EXPIRE', KEYS[10], tonumber(ARGV[13]))
  redis.call('HINCRBY', KEYS[11], ARGV[16], 1)
  redis.call('HINCRBY', KEYS[11], hit and ARGV[17] or ARGV[18], 1)
end
local cached = false
if image_json then
  -- with two servers, a result just finished is still here (a short copy) while the worker
  -- copies it to the cache: an upload in between finds it rather than computing it again
  if given ~= '' then cached = given else cached = redis.call('GET', result_key) end
end
if cached then
  if not split and redis.call('EXISTS', meta) == 0 then
    redis.call('SET', meta, image_json, 'EX', math.max(1, redis.call('TTL', result_key)))
  end
  -- the job keeps its own copy of the answer: the cached result may expire, be evicted or purged,
  -- and be computed again with other timings, but what this job answered never changes
  write_job('done', {'cached', '1', 'finished_at', now, 'result_key', result_key, 'result', cached})
  remember(ARGV[23])
  if redis.call('HGET', job, 'announce') == '1' then
    redis.call('ZADD', KEYS[8], redis.call('TIME')[1], job_id)
  else  -- settled at once: ARGV[26], as FINISH's ARGV[12] (the caller copies it to the cache role)
    redis.call('EXPIRE', job, tonumber(ARGV[26]))
  end
  count(true)
  return {'cached', image_json, cached}
end
if image_json and redis.call('EXISTS', inflight) == 1 then
  write_job('queued', {'cached', '0'})
  redis.call('RPUSH', attached, job_id)
  redis.call('EXPIRE', attached, job_ttl)  -- as long as its jobs: an outage cannot strand them
  remember(ARGV[24])
  count(false)
  return {'attached', image_json}
end
if image_bytes == '' then
  return {'miss', ''}
end
-- Still in flight though its inflight: entry expired (no worker took it for INFLIGHT_TTL_S): the
-- computation keeps its one message (the sweeper sends it again if it is lost) and its bytes are
-- counted once; this upload joins it, as if inflight: had been there.
local waiting = redis.call('ZSCORE', KEYS[7], ARGV[11])
local function depth(queue)  -- every priority list of the queue (shared.tasks.priority_lists)
  local n = redis.call('LLEN', queue)
  for step = 1, 9 do n = n + redis.call('LLEN', queue .. '\6\22' .. step) end
  return n
end
if not waiting and tonumber(ARGV[12]) > 0 and depth(KEYS[9]) >= tonumber(ARGV[12]) then
  return {'overloaded', ''}  -- new work waits behind a full queue: refuse it before writing anything
end
local in_flight = share ~= '' and tonumber(redis.call('HGET', KEYS[16], share) or '0') or 0
if not waiting and share_limit > 0 and in_flight >= share_limit then
  return {'overloaded_share', ''}  -- this sender's share of the queue is full; others still get in
end
local counted = tonumber(redis.call('HGET', KEYS[13], ARGV[11]) or '0')
if max_bytes > 0 and tonumber(redis.call('GET', KEYS[12]) or '0') + #image_bytes - counted > max_bytes then
  return {'overloaded_bytes', ''}  -- the uploads waiting already take MAX_QUEUED_MB
end
write_job('queued', {'cached', '0'})
redis.call('SET', inflight, job_id, 'EX', inflight_ttl)
redis.call('RPUSH', attached, job_id)
redis.call('EXPIRE', attached, job_ttl)  -- as long as its jobs: an outage cannot strand them
redis.call('SET', image, image_bytes, 'EX', image_ttl)
redis.call('SET', meta, image_json, 'EX', inflight_ttl)
redis.call('INCRBY', KEYS[12], #image_bytes - counted)
redis.call('HSET', KEYS[13], ARGV[11], #image_bytes)
remember(ARGV[24])
count(false)
if waiting then return {'attached', image_json} end
redis.call('ZADD', KEYS[7], ARGV[10], ARGV[11])
if share ~= '' then
  redis.call('HSET', KEYS[15], ARGV[11], share)
  redis.call('HINCRBY', KEYS[16], share, 1)
end
return {'new', image_json, in_flight}  -- in_flight: the share's computations before this one
"""

# KEYS: computations, owner, attached, result, image, attempts, started. ARGV: suffix, deadline, owner,
# owner TTL, job key prefix, now, attempts TTL. Returns {already done, the upload's bytes, attempt,
# the jobs that asked for a job.started event (also listed in ``started`` until their event exists)}.
# Only a computation still in flight (jobs attached, no result yet) gets an owner and counts an
# attempt: a late copy of a finished computation's message changes nothing (attempt 0), so it
# cannot recreate ``attempts:`` for the next upload of the same image.
CLAIM = """
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
local done = redis.call('EXISTS', KEYS[4]) == 1
local attempt = 0
local started = {}
if not done and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
  for _, id in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
    local job = ARGV[5] .. id
    if redis.call('HGET', job, 'status') == 'queued' then
      redis.call('HSET', job, 'status', 'running', 'started_at', ARGV[6])
      if redis.call('HGET', job, 'announce_started') == '1' then
        table.insert(started, id)
        redis.call('ZADD', KEYS[7], redis.call('TIME')[1], id)
      end
    end
  end
  attempt = redis.call('INCR', KEYS[6])
  redis.call('EXPIRE', KEYS[6], ARGV[7])
end
return {done and 1 or 0, redis.call('GET', KEYS[5]) or false, attempt, started}
"""

FINISH = """
local inflight, attached, image = KEYS[1], KEYS[2], KEYS[3]
local job_prefix, now, status, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local split = ARGV[11] == '1'  -- two servers: the worker fills the cache from what this returns
local copy = {}  -- for the cache: the header facts and (mode 'original') the upload itself
if split and status == 'done' then
  copy = {redis.call('GET', KEYS[7]) or false, ARGV[10] == 'original' and redis.call('GET', image) or false}
end
local answer = ARGV[5]  -- what the jobs keep: each done job holds its own copy of its answer
if status == 'done' then
  -- The first answer stands (NX): a second computation of the same work finishing later (a worker
  -- cut off from Redis while the sweeper had it done elsewhere, whose writes arrive when its link
  -- comes back) must not change the result, or its picture, of jobs already reported done.
  if redis.call('SET', KEYS[4], ARGV[5], 'EX', ttl, 'NX') then
    -- the picture gradcam.png is drawn on: the upload itself (renamed, no copy) or a thumbnail;
    -- with a cache server of its own (split), the worker copies it there instead
    if not split and ARGV[10] == 'original' and redis.call('EXISTS', image) == 1 then
      redis.call('RENAME', image, KEYS[5])
      redis.call('EXPIRE', KEYS[5], ttl)
    elseif not split and ARGV[10] == 'thumbnail' then
      redis.call('SET', KEYS[5], ARGV[6], 'EX', ttl)
    end
  else
    copy = {}  -- answered before: the cache keeps the first answer as well, and so do the jobs
    answer = redis.call('GET', KEYS[4])
  end
  redis.call('EXPIRE', KEYS[7], ttl)
elseif redis.call('EXISTS', KEYS[4]) == 1 then
  -- already answered (e.g. a hard time limit reported for the first message of a batch loop that
  -- had finished it long before): a late failure changes nothing
  return {{}, {}, {}, {}}
else
  redis.call('DEL', KEYS[7])
end
local ids = redis.call('LRANGE', attached, 0, -1)
local announce = {}  -- jobs with a webhook endpoint or a batch to tell
-- ARGV[12]: how long a settled job stays here (split: a short tail while the worker copies it to
-- the cache role, from ``records``; one server: JOB_RESULT_TTL_S); ARGV[13]: a job whose events
-- are not made yet stays this long, until the announcer makes them (shared/retention.py)
local records = {}
for _, id in ipairs(ids) do
  local job = job_prefix .. id
  if redis.call('EXISTS', job) == 1 then
    if redis.call('HGET', job, 'announce') == '1' then
      table.insert(announce, id)
      redis.call('ZADD', KEYS[11], redis.call('TIME')[1], id)  -- until its events exist (Announcer)
    end
    local notify = ARGV[8] .. id
    redis.call('RPUSH', notify, status)
    redis.call('EXPIRE', notify, 30)
    if status == 'done' then
      redis.call('HSET', job, 'status', 'done', 'finished_at', now, 'result_key', KEYS[4], 'result', answer)
    else
      redis.call('HSET', job, 'status', 'failed', 'finished_at', now, 'error', ARGV[5])
    end
    local awaited = redis.call('HGET', job, 'announce') == '1'
    redis.call('EXPIRE', job, awaited and ARGV[13] or ARGV[12])
    if split then table.insert(records, redis.call('HGETALL', job)) end
  end
end
redis.call('DEL', inflight, attached, image, KEYS[8], KEYS[10])
local size = redis.call('HGET', KEYS[13], ARGV[9])  -- its upload no longer waits
if size then
  redis.call('HDEL', KEYS[13], ARGV[9])
  redis.call('DECRBY', KEYS[12], size)
end
redis.call('ZREM', KEYS[9], ARGV[9])
local share = redis.call('HGET', KEYS[14], ARGV[9])  -- KEYS[14] queued:keys, KEYS[15] queued:shares
if share then
  redis.call('HDEL', KEYS[14], ARGV[9])
  if redis.call('HINCRBY', KEYS[15], share, -1) <= 0 then redis.call('HDEL', KEYS[15], share) end
end
redis.call('HINCRBY', KEYS[6], status .. ':' .. ARGV[7], 1)
return {ids, announce, copy, records}
"""

# KEYS: queued:bytes, queued:sizes. ARGV: the prefix of upload keys (``image:``).
# Count again what really waits: each computation's upload still in Redis, once. A size recorded
# for an upload that is gone (its computation ended some way that did not release it, or its bytes
# expired) is forgotten, and the counter is set to the sum. Returns {counter before, counter now}.
RECONCILE_QUEUED_BYTES = """
local sizes, total = redis.call('HGETALL', KEYS[2]), 0
for i = 1, #sizes, 2 do
  if redis.call('EXISTS', ARGV[1] .. sizes[i]) == 1 then
    total = total + tonumber(sizes[i + 1])
  else
    redis.call('HDEL', KEYS[2], sizes[i])
  end
end
local before = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[1], total)
return {before, total}
"""

# KEYS: queued:keys, queued:shares, computations. Count again each share's computations in flight:
# a suffix whose computation is no longer in flight (it ended some way that did not release it) is
# forgotten, and every share's count is set from what is left. Returns {total before, total now}.
RECONCILE_QUEUED_SHARES = """
local owners, counts = redis.call('HGETALL', KEYS[1]), {}
for i = 1, #owners, 2 do
  if redis.call('ZSCORE', KEYS[3], owners[i]) then
    counts[owners[i + 1]] = (counts[owners[i + 1]] or 0) + 1
  else
    redis.call('HDEL', KEYS[1], owners[i])
  end
end
local before, after = 0, 0
for _, n in ipairs(redis.call('HVALS', KEYS[2])) do before = before + tonumber(n) end
redis.call('DEL', KEYS[2])
for share, n in pairs(counts) do
  redis.call('HSET', KEYS[2], share, n)
  after = after + n
end
return {before, after}
"""
