"""The Lua scripts behind shared/jobs.py's JobStore: each is one atomic step of a job's life.

- ``SUBMIT``: answer an upload from the cache, attach it to the identical computation in flight, or
  start a new computation (job record, upload, single-flight keys, queued-bytes bound, and, when
  given one, its task message pushed at its priority step), in one step.
- ``CLAIM``: a worker starts a computation: its jobs running (those that asked for ``job.started``
  listed for the announcer), its owner, one more attempt. Queued jobs past their deadline fail
  ``deadline_exceeded`` there; a computation no job waits for any more (all canceled or expired) is
  skipped: its bookkeeping released as FINISH would, no owner, no attempt.
- ``CANCEL``: a queued or running job ends ``canceled`` and leaves its computation's attached list.
- ``DROP_UNWAITED``: the sweeper's step before sending a computation again: fail its queued jobs past
  their deadline and, when none waits any more, release it rather than send it.
- ``FINISH``: settle every attached job of a computation not settled yet (done with its result, or
  failed; a canceled or expired one keeps its status), keep the
  result (the first written stands), and release the single-flight and queued-bytes bookkeeping.
- ``RECONCILE_QUEUED_BYTES``: the sweeper's recount of the uploads waiting for workers.
- ``RECONCILE_QUEUED_SHARES``: the sweeper's recount of each sender's computations in flight.

Their keys and arguments are passed by JobStore; read them beside the method that calls each.
"""
from shared.tasks import LANE_STEPS

# What one job waiting for a worker takes on the main Redis beside its upload, measured with
# MEMORY USAGE on Redis 7 (an 8x8 PNG, the null model): its record ~860 bytes; and per computation,
# its Celery message ~1,400, inflight:, meta:, attached:, the upload key's own overhead, its entries in
# ``computations`` and ``queued:sizes``: ~2,600 together. MAX_QUEUED_MB bounds uploads plus these, so
# a backlog of small images cannot fill the server with records (docs/scaling.md, "Main Redis").
WAITING_JOB_BYTES = 900
WAITING_COMPUTATION_BYTES = 2_800

SUBMIT = (f"local JOB_BYTES, COMPUTATION_BYTES = {WAITING_JOB_BYTES}, {WAITING_COMPUTATION_BYTES}\n"
          f"local LANE_STEPS = {LANE_STEPS}\n") + """
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
-- a job submitted before its image (image_url) and canceled while its image was fetched stays canceled
if redis.call('HGET', job, 'status') == 'canceled' then return {'canceled', ''} end
if key_name ~= '-' and redis.call('GET', key_name) ~= ARGV[22] then
  return {'key_lost', ''}  -- its lease ran out and another request holds the key now
end
local function remember(record)
  if key_name ~= '-' then redis.call('SET', key_name, record, 'EX', tonumber(ARGV[25])) end
end
-- Fair share (KEYS[15] queued:keys, KEYS[16] queued:shares): ARGV[27] the sender's share (API key
-- or address; '' none), ARGV[28] the most computations one share may have in flight (0: no limit).
local share, share_limit = ARGV[27], tonumber(ARGV[28])
-- ARGV[29..32]: the task message to push when this starts new work (shared.tasks.StepMessage: its
-- text before and after its priority step, the lane's first step, the sender's weight); '' none.
local message_head, message_tail, lane_step, weight = ARGV[29], ARGV[30], tonumber(ARGV[31]), tonumber(ARGV[32])
local function write_job(status, extra)
  for i = 33, #ARGV do table.insert(extra, ARGV[i]) end  -- owner, callback_url, batch_id, announce
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
-- MAX_QUEUED_MB counts every job waiting (its record) and every computation waiting (its upload,
-- message and bookkeeping), each once, as the computation's share in queued:sizes (KEYS[13])
local counted = tonumber(redis.call('HGET', KEYS[13], ARGV[11]) or '0')
local function room_for(add)
  return max_bytes <= 0 or tonumber(redis.call('GET', KEYS[12]) or '0') + add <= max_bytes
end
local function count_waiting(add)
  redis.call('INCRBY', KEYS[12], add)
  redis.call('HSET', KEYS[13], ARGV[11], counted + add)
end
if image_json and redis.call('EXISTS', inflight) == 1 then
  if counted > 0 then
    if not room_for(JOB_BYTES) then return {'overloaded_bytes', ''} end
    count_waiting(JOB_BYTES)
  end
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
  for step = 1, 9 do n = n + redis.call('LLEN', queue .. '\\6\\22' .. step) end
  return n
end
if not waiting and tonumber(ARGV[12]) > 0 and depth(KEYS[9]) >= tonumber(ARGV[12]) then
  return {'overloaded', ''}  -- new work waits behind a full queue: refuse it before writing anything
end
local in_flight = share ~= '' and tonumber(redis.call('HGET', KEYS[16], share) or '0') or 0
if not waiting and share_limit > 0 and in_flight >= share_limit then
  return {'overloaded_share', ''}  -- this sender's share of the queue is full; others still get in
end
-- a computation still counted gains one job; one not counted (new, or its count reconciled away)
-- its upload, message and bookkeeping as well
local add = JOB_BYTES
if counted == 0 then add = add + #image_bytes + COMPUTATION_BYTES end
if not room_for(add) then
  return {'overloaded_bytes', ''}  -- the work waiting already takes MAX_QUEUED_MB
end
write_job('queued', {'cached', '0'})
redis.call('SET', inflight, job_id, 'EX', inflight_ttl)
redis.call('RPUSH', attached, job_id)
redis.call('EXPIRE', attached, job_ttl)  -- as long as its jobs: an outage cannot strand them
redis.call('SET', image, image_bytes, 'EX', image_ttl)
redis.call('SET', meta, image_json, 'EX', inflight_ttl)
count_waiting(add)
remember(ARGV[24])
count(false)
if waiting then return {'attached', image_json} end
redis.call('ZADD', KEYS[7], ARGV[10], ARGV[11])
if share ~= '' then
  redis.call('HSET', KEYS[15], ARGV[11], share)
  redis.call('HINCRBY', KEYS[16], share, 1)
end
if message_head == '' then
  return {'new', image_json, in_flight, -1}  -- in_flight: the share's computations before this one
end
-- the step grows with the sender's backlog (shared.tasks.step_for), and the message goes to its list
-- (shared.tasks.priority_lists) in this same step: no job of a new computation is without its message
local backlog, level = in_flight / math.max(weight, 1e-9), 0
while backlog >= 10 and level < LANE_STEPS - 1 do backlog, level = backlog / 10, level + 1 end
local step = lane_step + level
redis.call('LPUSH', step == 0 and KEYS[9] or KEYS[9] .. '\\6\\22' .. step, message_head .. step .. message_tail)
return {'new', image_json, in_flight, step}
"""

# Settle one job as a script does when it ends it here (CLAIM: past its deadline; CANCEL): wake its
# waiters, list it for its events when someone awaits them, and shorten its life on this server
# (shared/retention.py). Returns its hash, for the caller to copy to the cache role.
_SETTLE_JOB = """
local function settle_job(job, id, notify, announce_key, settled_ttl, awaited_ttl, status)
  redis.call('RPUSH', notify, status)
  redis.call('EXPIRE', notify, 30)
  local awaited = redis.call('HGET', job, 'announce') == '1'
  if awaited then redis.call('ZADD', announce_key, redis.call('TIME')[1], id) end
  redis.call('EXPIRE', job, awaited and awaited_ttl or settled_ttl)
  return redis.call('HGETALL', job)
end
"""

# Release a computation's single-flight and queued-bytes bookkeeping, as FINISH does when it ends.
# KEYS of the caller, in its own order: inflight, attached, image, attempts, owner, meta,
# computations, queued:bytes, queued:sizes; and the sender's count in flight (KEYS[13] queued:keys,
# KEYS[14] queued:shares of CLAIM and DROP_UNWAITED, as FINISH's KEYS[14..15]).
_RELEASE = """
local function release(inflight, attached, image, attempts, owner, meta, computations, qbytes, qsizes, suffix)
  redis.call('DEL', inflight, attached, image, attempts, owner, meta)
  local size = redis.call('HGET', qsizes, suffix)
  if size then
    redis.call('HDEL', qsizes, suffix)
    redis.call('DECRBY', qbytes, size)
  end
  redis.call('ZREM', computations, suffix)
  local share = redis.call('HGET', KEYS[13], suffix)
  if share then
    redis.call('HDEL', KEYS[13], suffix)
    if redis.call('HINCRBY', KEYS[14], share, -1) <= 0 then redis.call('HDEL', KEYS[14], share) end
  end
end
"""

# Fail the queued jobs of a computation whose deadline passed (they leave its attached list) and
# return the ids of those still waiting for it (queued or running). ARGV of the caller, from ``at``:
# now (unix seconds), the deadline_exceeded error JSON, notify key prefix, how long a settled job
# stays here, how long one whose events are not made yet stays. Appends the failed jobs awaiting
# events to ``announce`` and every failed job's hash to ``records``.
_EXPIRE_LATE = _SETTLE_JOB + """
local function expire_late(attached, announce_key, prefix, now_iso, at, announce, records)
  local now, err, notify = tonumber(ARGV[at]), ARGV[at + 1], ARGV[at + 2]
  local waiting = {}
  for _, id in ipairs(redis.call('LRANGE', attached, 0, -1)) do
    local job = prefix .. id
    local status = redis.call('HGET', job, 'status')
    local by = tonumber(redis.call('HGET', job, 'deadline') or '')
    if status == 'queued' and by and by < now then
      redis.call('HSET', job, 'status', 'failed', 'finished_at', now_iso, 'error', err)
      redis.call('LREM', attached, 0, id)
      table.insert(records, settle_job(job, id, notify .. id, announce_key, ARGV[at + 3], ARGV[at + 4], 'failed'))
      if redis.call('HGET', job, 'announce') == '1' then table.insert(announce, id) end
    elseif status == 'queued' or status == 'running' then
      table.insert(waiting, id)
    end
  end
  return waiting
end
"""

# KEYS: computations, owner, attached, result, image, attempts, started, inflight, queued:bytes,
# queued:sizes, announce, meta, queued:keys, queued:shares. ARGV: suffix, deadline, owner, owner TTL, job key prefix, now, attempts
# TTL, then from ARGV[8] what expire_late reads (now in unix seconds, the deadline_exceeded error
# JSON, notify key prefix, the two TTLs of a settled job).
# Returns {already done, the upload's bytes, attempt, the jobs that asked for a job.started event
# (also listed in ``started`` until their event exists), skipped, the jobs failed past their
# deadline that await events, those jobs' hashes (flat)}.
# Only a computation still in flight (jobs waiting, no result yet) gets an owner and counts an
# attempt: a late copy of a finished computation's message changes nothing (attempt 0), so it
# cannot recreate ``attempts:`` for the next upload of the same image. A queued job whose deadline
# passed fails ``deadline_exceeded`` and leaves the computation; one that nobody waits for any more
# (its jobs canceled or expired) is skipped (1): released, never computed.
CLAIM = _EXPIRE_LATE + _RELEASE + """
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
local started, announce, records = {}, {}, {}
if redis.call('EXISTS', KEYS[4]) == 1 then return {1, redis.call('GET', KEYS[5]) or false, 0, started, 0, announce, records} end
local waiting = expire_late(KEYS[3], KEYS[11], ARGV[5], ARGV[6], 8, announce, records)
if #waiting == 0 then
  release(KEYS[8], KEYS[3], KEYS[5], KEYS[6], KEYS[2], KEYS[12], KEYS[1], KEYS[9], KEYS[10], ARGV[1])
  return {0, false, 0, started, 1, announce, records}
end
for _, id in ipairs(waiting) do
  local job = ARGV[5] .. id
  if redis.call('HGET', job, 'status') == 'queued' then
    redis.call('HSET', job, 'status', 'running', 'started_at', ARGV[6])
    if redis.call('HGET', job, 'announce_started') == '1' then
      table.insert(started, id)
      redis.call('ZADD', KEYS[7], redis.call('TIME')[1], id)
    end
  end
end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
local attempt = redis.call('INCR', KEYS[6])
redis.call('EXPIRE', KEYS[6], ARGV[7])
return {0, redis.call('GET', KEYS[5]) or false, attempt, started, 0, announce, records}
"""

# The sweeper's check before it sends a computation again: KEYS and ARGV as CLAIM's (ARGV[2..4] and
# ARGV[7] unused). Fails the queued jobs past their deadline; when no job waits any more, releases
# the computation instead of having it sent. Returns {released (1/0), the failed jobs awaiting
# events, the failed jobs' hashes}.
DROP_UNWAITED = _EXPIRE_LATE + _RELEASE + """
local announce, records = {}, {}
local waiting = expire_late(KEYS[3], KEYS[11], ARGV[5], ARGV[6], 8, announce, records)
if #waiting > 0 or redis.call('EXISTS', KEYS[4]) == 1 then return {0, announce, records} end
release(KEYS[8], KEYS[3], KEYS[5], KEYS[6], KEYS[2], KEYS[12], KEYS[1], KEYS[9], KEYS[10], ARGV[1])
return {1, announce, records}
"""

# KEYS: job, attached ('-': its image is not submitted yet), announce, notify. ARGV: job id, now, how
# long a settled job stays here, how long one whose events are not made yet stays.
# A queued or running job ends ``canceled`` and leaves its computation (which goes on for the jobs
# still attached; CLAIM skips one nobody waits for). Returns {'canceled', its hash (flat)}; or
# {'already'} (canceled before), {'settled'} (done or failed: nothing changes), {'missing'} (not on
# this server: settled long enough ago to live on the cache role alone, or gone).
CANCEL = _SETTLE_JOB + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status == 'canceled' then return {'already'} end
if status ~= 'queued' and status ~= 'running' then return {'settled'} end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'fetch')  -- an image_url job: its download, if still to come, is skipped
if KEYS[2] ~= '-' then redis.call('LREM', KEYS[2], 0, ARGV[1]) end
return {'canceled', settle_job(KEYS[1], ARGV[1], KEYS[4], KEYS[3], ARGV[3], ARGV[4], 'canceled')}
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
  local was = redis.call('HGET', job, 'status')
  if was == 'queued' or was == 'running' then  -- a canceled or expired job keeps its status
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
