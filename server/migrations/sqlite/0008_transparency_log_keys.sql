-- The public keys of the transparency logs of the servers sharing this database (each server
-- signs SCTs with its own log key): a server that requires agents' SVIDs to carry an SCT
-- accepts one from any of them.
CREATE TABLE ct_log_keys (
    log_id BLOB PRIMARY KEY NOT NULL,
    public_key BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
