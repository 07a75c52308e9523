-- linkid's current schema on SQLite (version 1; PRAGMA user_version holds it).
-- A database is created and upgraded by the migrations in
-- src/store/sqlite.rs, in order; a test holds them to this file.

-- Which account at a remote identity provider belongs to which local user.
CREATE TABLE IF NOT EXISTS linked_identities (
    id              INTEGER PRIMARY KEY,
    user_id         TEXT NOT NULL,
    provider_id     TEXT NOT NULL,
    linked_user_id  TEXT NOT NULL,
    linked_username TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    -- A user may be linked to one identity provider at a time
    -- (violations are USER_ALREADY_LINKED).
    CONSTRAINT one_link_per_user UNIQUE (user_id),
    -- A remote identity belongs to at most one local user, which stops
    -- account take-over (violations are IDENTITY_ALREADY_LINKED).
    CONSTRAINT one_user_per_remote_identity UNIQUE (provider_id, linked_user_id)
) STRICT;

-- Revocation ids of refused tokens; the server polls this table.
CREATE TABLE IF NOT EXISTS revoked_tokens (
    seq           INTEGER PRIMARY KEY,
    revocation_id TEXT NOT NULL UNIQUE,
    revoked_at    TEXT NOT NULL
) STRICT;
