-- The issuance transparency log (RFC 6962 structures, see kame_api::ct). Entries are numbered
-- from a one-row counter updated in the appending transaction, so sequence numbers follow
-- commit order with no gaps or duplicates, whichever server appends.
CREATE TABLE ct_log_counter (
    only_row INTEGER PRIMARY KEY NOT NULL CHECK (only_row = 1),
    size BIGINT NOT NULL
);
INSERT INTO ct_log_counter (only_row, size) VALUES (1, 0);
-- One row per entry: the MerkleTreeLeaf (leaf input), its leaf hash, and the extra data
-- get-entries returns (empty so far: an X509-SVID is known by its TBSCertificate in the leaf).
CREATE TABLE ct_log_entries (
    seq BIGINT PRIMARY KEY NOT NULL,
    leaf_input BYTEA NOT NULL,
    leaf_hash BYTEA NOT NULL,
    extra BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX ct_log_entries_leaf_hash ON ct_log_entries (leaf_hash);
-- Signed tree heads, one per tree size each server's log key has signed (servers sharing a
-- database append to one tree; each signs its heads with its own key, named by its log ID).
CREATE TABLE ct_tree_heads (
    log_id BYTEA NOT NULL,
    tree_size BIGINT NOT NULL,
    timestamp BIGINT NOT NULL,
    root_hash BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    PRIMARY KEY (log_id, tree_size)
);
