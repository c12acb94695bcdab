-- Applied at every start and after every database outage, so every statement
-- is idempotent. The service runs it under an advisory lock.

-- The product: online objects and the receipt time of the latest callback
-- that named them. Rows older than the TTL are deleted by the reaper, which
-- finds them through the last_seen index.
CREATE TABLE IF NOT EXISTS objects (
    id        BIGINT PRIMARY KEY,
    last_seen TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_last_seen_idx ON objects (last_seen);

-- Accepted callbacks not yet applied. A row is written before the callback is
-- acknowledged and deleted in the statement that applies it. A row belongs to
-- its owner while the owner's lease in journal_owners lasts (one row per
-- instance, renewed every second, so holding thousands of callbacks costs no
-- per-row updates); lease_until is the row's own lease, set when it is
-- written or taken over. Any instance takes over a row whose own lease and
-- whose owner's lease both ran out (a parked row's owner is '', which never
-- has a lease).
CREATE TABLE IF NOT EXISTS callback_journal (
    id          BIGINT PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL,
    object_ids  BIGINT[] NOT NULL,
    owner       TEXT NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL
);
-- The journal's rows are found through their owner: a skip scan of this
-- index lists the owners, then takeover reads only the rows of owners
-- without a live lease, and expiry each owner's oldest rows. (The indexes on
-- lease_until and received_at it replaces cost a write per callback each,
-- and takeover through them read every row held past its own lease.)
CREATE INDEX IF NOT EXISTS callback_journal_owner_idx ON callback_journal (owner, received_at);
DROP INDEX IF EXISTS callback_journal_lease_idx;
DROP INDEX IF EXISTS callback_journal_received_idx;

CREATE TABLE IF NOT EXISTS journal_owners (
    owner       TEXT PRIMARY KEY,
    lease_until TIMESTAMPTZ NOT NULL
);
