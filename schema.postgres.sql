-- linkid's current schema on PostgreSQL (version 4, recorded in
-- linkid_schema_version). linkid creates and upgrades it by itself: the
-- migrations in src/store/postgres/migrations.rs run at start-up, in order,
-- in one transaction under an advisory lock; a test holds them to this
-- file. Applied by hand (say by a DBA, so that linkid's own role needs no
-- CREATE privilege), it makes a database linkid accepts as current.

-- The schema version: one row.
CREATE TABLE linkid_schema_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   integer NOT NULL
);

-- Which account at a remote identity provider belongs to which local user.
CREATE TABLE linked_identities (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         text NOT NULL,
    provider_id     text NOT NULL,
    -- Texts are kept in Unicode NFC; the remote id as first given.
    linked_user_id  text NOT NULL,
    linked_username text NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    -- What the remote id is compared by: the id itself, or at a provider
    -- with case_insensitive_ids its case fold (Unicode canonical caseless
    -- form), computed by linkid.
    linked_user_key text NOT NULL,
    -- A user may be linked to one identity provider at a time
    -- (violations are USER_ALREADY_LINKED).
    CONSTRAINT one_link_per_user UNIQUE (user_id),
    -- A remote identity belongs to at most one local user, which stops
    -- account take-over (violations are IDENTITY_ALREADY_LINKED).
    CONSTRAINT one_user_per_remote_identity UNIQUE (provider_id, linked_user_key)
);

-- The providers whose keys are case folds, as last applied: a start with
-- another case_insensitive_ids setting recomputes that provider's keys.
CREATE TABLE case_insensitive_providers (
    provider_id text PRIMARY KEY
);

-- The next value of `sequence`, for a log that pollers read with
-- `seq > last_seen`. PostgreSQL hands out sequence values before commit,
-- so a transaction that took a smaller value could commit after one that
-- took a larger value, and a poller would skip it. The transaction-scoped
-- advisory lock (one per sequence) is held from taking the value until
-- commit, so values become visible in order. Every writer of such a log
-- goes through this function.
CREATE FUNCTION linkid_next_seq(sequence regclass) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1818848875, sequence::oid::integer);
    RETURN nextval(sequence);
END
$$;

-- Revocation ids of refused tokens; every instance polls this table.
CREATE TABLE revoked_tokens (
    seq           bigint PRIMARY KEY,
    revocation_id text NOT NULL UNIQUE,
    revoked_at    timestamptz NOT NULL
);

-- No default: a row gets its seq from linkid_next_seq only.
CREATE SEQUENCE revoked_tokens_seq AS bigint OWNED BY revoked_tokens.seq;

-- Records a revocation id; true when it is new.
CREATE FUNCTION linkid_revoke(revocation text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM revoked_tokens WHERE revocation_id = revocation) THEN
        RETURN false;
    END IF;
    INSERT INTO revoked_tokens (seq, revocation_id, revoked_at)
    VALUES (linkid_next_seq('revoked_tokens_seq'), revocation, now())
    ON CONFLICT (revocation_id) DO NOTHING;
    RETURN FOUND;
END
$$;

-- Search in user_id order, compared byte by byte as SQLite does (the "C"
-- collation), whatever the database's collation: the whole walk and one
-- provider's walk are index scans, the reverse lookup a seek on
-- one_user_per_remote_identity.
CREATE INDEX links_by_user ON linked_identities (user_id COLLATE "C");
CREATE INDEX links_by_provider ON linked_identities (provider_id, user_id COLLATE "C");

-- The change feed: every change, recorded in the change's own transaction,
-- its seq taken from linkid_next_seq as the transaction's last step, so
-- that seqs become visible in commit order.
CREATE TABLE events (
    seq             bigint PRIMARY KEY,
    type            text NOT NULL CHECK (type IN ('LINKED', 'UPDATED', 'UNLINKED')),
    occurred_at     timestamptz NOT NULL,
    user_id         text NOT NULL,
    provider_id     text NOT NULL,
    linked_user_id  text NOT NULL,
    linked_username text NOT NULL,
    -- The token's log id, or "import" / "upgrade".
    actor           text NOT NULL,
    -- The token's subject("...") fact.
    subject         text,
    request_id      text
);

-- No default: an event gets its seq from linkid_next_seq only.
CREATE SEQUENCE events_seq AS bigint OWNED BY events.seq;

-- The newest seq that retention pruned: asking for events after an older
-- one is 410 EVENTS_EXPIRED.
CREATE TABLE feed_state (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through bigint NOT NULL
);
INSERT INTO feed_state (pruned_through) VALUES (0);

-- Where each webhook stands: its delivery resumes here after a restart
-- (domain::WebhookStanding).
CREATE TABLE webhook_standings (
    webhook         text PRIMARY KEY,
    state           text NOT NULL CHECK (state IN ('ACTIVE', 'RETRYING', 'DISABLED', 'EXPIRED')),
    -- Every event up to this seq was delivered or skipped by the filters.
    delivered_seq   bigint NOT NULL,
    attempts        integer NOT NULL,
    last_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    next_attempt_at timestamptz,
    -- Bumped by `linkid webhooks replay` / `enable`.
    generation      bigint NOT NULL
);

-- Who delivers for a webhook: one instance at a time, until `until` by the
-- database's clock unless it renews the lease.
CREATE TABLE webhook_leases (
    webhook text PRIMARY KEY,
    holder  text NOT NULL,
    until   timestamptz NOT NULL
);

-- This file is the whole of version 4.
INSERT INTO linkid_schema_version (version) VALUES (4);
