-- Kame server datastore on PostgreSQL: the schema SQLite reaches through its migrations
-- 0001-0005, with PostgreSQL's types (BIGINT, BOOLEAN, BYTEA).
CREATE TABLE registered_entries (
    id TEXT PRIMARY KEY NOT NULL,
    unique_key TEXT NOT NULL UNIQUE,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    hint TEXT NOT NULL DEFAULT '',
    downstream BOOLEAN NOT NULL DEFAULT FALSE,
    revision_number BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX registered_entries_spiffe_id ON registered_entries (spiffe_id);
CREATE INDEX registered_entries_parent_id ON registered_entries (parent_id);

-- A ban is a state of its own that no other write clears; evicting the agent lifts it.
CREATE TABLE attested_nodes (
    spiffe_id TEXT PRIMARY KEY NOT NULL,
    data TEXT NOT NULL,
    banned BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE join_tokens (
    token TEXT PRIMARY KEY NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE bundles (
    trust_domain TEXT PRIMARY KEY NOT NULL,
    data BYTEA NOT NULL
);

CREATE TABLE ca_journals (
    server_id TEXT PRIMARY KEY NOT NULL,
    data BYTEA NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Key intents: written before a KeyManager creates a key, removed once the CA journal that
-- references the key is saved.
CREATE TABLE key_intents (
    intent_id TEXT PRIMARY KEY NOT NULL,
    server_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_type TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX key_intents_server ON key_intents (server_id);

-- Revocation readiness: the authorities each agent last reported, and when.
CREATE TABLE agent_svid_authorities (
    spiffe_id TEXT PRIMARY KEY NOT NULL,
    authorities TEXT NOT NULL,
    seen_at BIGINT NOT NULL
);

-- Entry change events, numbered from a one-row counter updated last before commit: the
-- counter's row lock is held to commit, so ids follow commit order without gaps.
CREATE TABLE entry_event_counter (
    only_row INTEGER PRIMARY KEY NOT NULL CHECK (only_row = 1),
    last_id BIGINT NOT NULL
);
INSERT INTO entry_event_counter (only_row, last_id) VALUES (1, 0);
CREATE TABLE entry_events (
    id BIGINT PRIMARY KEY NOT NULL,
    entry_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX entry_events_created_at ON entry_events (created_at);

-- Attested-node change events, the same way: servers follow them to keep their node caches
-- (who is attested, banned, with which serial numbers) current.
CREATE TABLE node_event_counter (
    only_row INTEGER PRIMARY KEY NOT NULL CHECK (only_row = 1),
    last_id BIGINT NOT NULL
);
INSERT INTO node_event_counter (only_row, last_id) VALUES (1, 0);
CREATE TABLE node_events (
    id BIGINT PRIMARY KEY NOT NULL,
    spiffe_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX node_events_created_at ON node_events (created_at);
