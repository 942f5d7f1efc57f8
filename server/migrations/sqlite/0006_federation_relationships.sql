-- Federation relationships made through the TrustDomain API: the trust domain, and the
-- relationship (endpoint URL and profile) as a protobuf spire.api.types.FederationRelationship
-- without its bundle (federated bundles live in `bundles`).
CREATE TABLE federation_relationships (
    trust_domain TEXT PRIMARY KEY NOT NULL,
    data BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
