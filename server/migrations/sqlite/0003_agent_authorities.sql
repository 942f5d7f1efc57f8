-- Revocation readiness: which authorities each agent's SVIDs (its own and its workloads')
-- chain to, as the agent last reported in its sync, and when.
CREATE TABLE agent_svid_authorities (
    spiffe_id TEXT PRIMARY KEY NOT NULL,
    authorities TEXT NOT NULL,
    seen_at INTEGER NOT NULL
);
