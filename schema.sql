-- linkid's current schema on SQLite (version 4; PRAGMA user_version holds it).
-- A database is created and upgraded by the migrations in
-- src/store/sqlite.rs, in order; a test holds them to this file.

-- Which account at a remote identity provider belongs to which local user.
CREATE TABLE IF NOT EXISTS linked_identities (
    id              INTEGER PRIMARY KEY,
    user_id         TEXT NOT NULL,
    provider_id     TEXT NOT NULL,
    -- Texts are kept in Unicode NFC; the remote id as first given.
    linked_user_id  TEXT NOT NULL,
    -- What the remote id is compared by: the id itself, or at a provider
    -- with case_insensitive_ids its case fold (Unicode canonical caseless form).
    linked_user_key TEXT NOT NULL,
    linked_username TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    -- A user may be linked to one identity provider at a time
    -- (violations are USER_ALREADY_LINKED).
    CONSTRAINT one_link_per_user UNIQUE (user_id),
    -- A remote identity belongs to at most one local user, which stops
    -- account take-over (violations are IDENTITY_ALREADY_LINKED).
    CONSTRAINT one_user_per_remote_identity UNIQUE (provider_id, linked_user_key)
) STRICT;

-- The providers whose keys are case folds, as last applied: a start with
-- another case_insensitive_ids setting recomputes that provider's keys.
CREATE TABLE IF NOT EXISTS case_insensitive_providers (
    provider_id TEXT PRIMARY KEY
) STRICT;

-- Revocation ids of refused tokens; the server polls this table.
CREATE TABLE IF NOT EXISTS revoked_tokens (
    seq           INTEGER PRIMARY KEY,
    revocation_id TEXT NOT NULL UNIQUE,
    revoked_at    TEXT NOT NULL
) STRICT;

-- Search by provider in user_id order (keyset paging).
CREATE INDEX IF NOT EXISTS links_by_provider ON linked_identities (provider_id, user_id);

-- The change feed: every change, recorded in the change's own transaction.
-- A seq is the rowid: one more than the newest event's. Pruning always keeps
-- the newest event, so a seq is never handed out twice.
CREATE TABLE IF NOT EXISTS events (
    seq             INTEGER PRIMARY KEY,
    type            TEXT NOT NULL CHECK (type IN ('LINKED', 'UPDATED', 'UNLINKED')),
    occurred_at     TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    provider_id     TEXT NOT NULL,
    linked_user_id  TEXT NOT NULL,
    linked_username TEXT NOT NULL,
    -- The token's log id, or "import" / "upgrade".
    actor           TEXT NOT NULL,
    -- The token's subject("...") fact.
    subject         TEXT,
    request_id      TEXT
) STRICT;

-- The newest seq that retention pruned: asking for events after an older
-- one is 410 EVENTS_EXPIRED.
CREATE TABLE IF NOT EXISTS feed_state (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through INTEGER NOT NULL
) STRICT;

-- Where each webhook stands: its delivery resumes here after a restart
-- (domain::WebhookStanding). Times are RFC 3339 UTC.
CREATE TABLE IF NOT EXISTS webhook_standings (
    webhook         TEXT PRIMARY KEY,
    state           TEXT NOT NULL CHECK (state IN ('ACTIVE', 'RETRYING', 'DISABLED', 'EXPIRED')),
    -- Every event up to this seq was delivered or skipped by the filters.
    delivered_seq   INTEGER NOT NULL,
    attempts        INTEGER NOT NULL,
    last_attempt_at TEXT,
    last_status     INTEGER,
    last_error      TEXT,
    next_attempt_at TEXT,
    -- Bumped by `linkid webhooks replay` / `enable`.
    generation      INTEGER NOT NULL
) STRICT;
