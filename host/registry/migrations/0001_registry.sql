-- kframe's tenant registry, shared by every replica.
--
-- Every write transaction first increments the one row of registry_version and
-- stamps what it changes with the new version. That row lock orders writers, so
-- versions commit in order: a reader that sees version V sees every change up to V.

CREATE TABLE registry_version (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    version BIGINT NOT NULL
);
INSERT INTO registry_version (singleton, version) VALUES (TRUE, 0);

-- One row per live tenant. The api key itself is never stored, only its keyed hash.
CREATE TABLE tenants (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_id TEXT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch >= 0),
    tier SMALLINT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    created_unix BIGINT NOT NULL,
    changed BIGINT NOT NULL
);
CREATE INDEX tenants_changed ON tenants (changed);

-- Every epoch a tenant has held, once: a re-key inserts the next one.
CREATE TABLE key_epochs (
    tenant_id BIGINT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    epoch BIGINT NOT NULL,
    since_unix BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, epoch)
);

-- Tenants deleted, so that replicas learn of a delete by version.
CREATE TABLE deleted_tenants (
    id BIGINT PRIMARY KEY,
    changed BIGINT NOT NULL
);
CREATE INDEX deleted_tenants_changed ON deleted_tenants (changed);

-- The operator's policy component per kind; a row with no wasm is a cleared kind.
CREATE TABLE policies (
    kind TEXT PRIMARY KEY,
    name TEXT,
    config TEXT,
    wasm BYTEA,
    sha256 TEXT,
    changed BIGINT NOT NULL
);

CREATE TABLE prefixes (
    id BIGSERIAL PRIMARY KEY,
    text TEXT NOT NULL UNIQUE,
    changed BIGINT NOT NULL
);
