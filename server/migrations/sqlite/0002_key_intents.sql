-- Key intents: written before a KeyManager creates a key, removed once the CA journal that
-- references the key is saved. A pending intent after a crash names the key to reuse (or to
-- dispose of), so a crash loop cannot leak keys in a KMS, Vault or HSM.
CREATE TABLE key_intents (
    intent_id TEXT PRIMARY KEY NOT NULL,
    server_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_type TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX key_intents_server ON key_intents (server_id);
