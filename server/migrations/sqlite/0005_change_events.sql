-- Change events. Entries: every write of a registration entry appends one row in the same
-- transaction, numbered from a one-row counter taken last before commit, so event ids follow
-- commit order without gaps. Each server follows them to keep its entry cache current.
CREATE TABLE entry_event_counter (
    only_row INTEGER PRIMARY KEY NOT NULL CHECK (only_row = 1),
    last_id INTEGER NOT NULL
);
INSERT INTO entry_event_counter (only_row, last_id) VALUES (1, 0);
CREATE TABLE entry_events (
    id INTEGER PRIMARY KEY NOT NULL,
    entry_id TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX entry_events_created_at ON entry_events (created_at);

-- Attested-node change events, the same way: servers follow them to keep their node caches
-- (who is attested, banned, with which serial numbers) current.
CREATE TABLE node_event_counter (
    only_row INTEGER PRIMARY KEY NOT NULL CHECK (only_row = 1),
    last_id INTEGER NOT NULL
);
INSERT INTO node_event_counter (only_row, last_id) VALUES (1, 0);
CREATE TABLE node_events (
    id INTEGER PRIMARY KEY NOT NULL,
    spiffe_id TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX node_events_created_at ON node_events (created_at);
