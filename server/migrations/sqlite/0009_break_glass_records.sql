-- Break-glass records agents report when servers answer again: each line as the agent wrote
-- and signed it (kame_api::breakglass), checked before it is stored, numbered per agent.
CREATE TABLE break_glass_records (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    line TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
