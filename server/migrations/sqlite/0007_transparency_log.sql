-- The issuance transparency log (RFC 6962 structures, see kame_api::ct). Entries are numbered
-- from a one-row counter updated in the appending transaction, so sequence numbers follow
-- commit order with no gaps or duplicates, whichever server appends.
CREATE TABLE ct_log_counter (
    only_row INTEGER PRIMARY KEY NOT NULL CHECK (only_row = 1),
    size INTEGER NOT NULL
);
INSERT INTO ct_log_counter (only_row, size) VALUES (1, 0);
-- One row per entry: the MerkleTreeLeaf (leaf input), its leaf hash, and the extra data
-- get-entries returns (empty so far: an X509-SVID is known by its TBSCertificate in the leaf).
CREATE TABLE ct_log_entries (
    seq INTEGER PRIMARY KEY NOT NULL,
    leaf_input BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    extra BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX ct_log_entries_leaf_hash ON ct_log_entries (leaf_hash);
-- Signed tree heads, one per tree size each server's log key has signed (servers sharing a
-- database append to one tree; each signs its heads with its own key, named by its log ID).
CREATE TABLE ct_tree_heads (
    log_id BLOB NOT NULL,
    tree_size INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    root_hash BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (log_id, tree_size)
);
