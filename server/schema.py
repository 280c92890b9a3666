"""The database schema of each backend, as numbered migration steps.

Each tuple's entry N migrates that backend from version N to N+1; a released step is
never edited, only followed by a new one. `zfs-unlock-server migrate` applies them;
everything else opens a database only at exactly the version it was written for.
"""

from __future__ import annotations

from zfs_unlock_server.errors import ConfigError


class SchemaMismatch(ConfigError):
    """The database is at a schema version this server was not written for."""


SQLITE: tuple[str, ...] = (
    """
    CREATE TABLE hosts (
        id               INTEGER PRIMARY KEY,
        name             TEXT NOT NULL UNIQUE,
        machine_id       TEXT NOT NULL UNIQUE,
        allowed_networks TEXT NOT NULL DEFAULT '[]',
        pools            TEXT NOT NULL DEFAULT '[]',
        enabled          INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
        disabled_reason  TEXT NOT NULL DEFAULT '',
        deadman_timeout  INTEGER CHECK (deadman_timeout IS NULL OR deadman_timeout >= 0),
        created_at       INTEGER NOT NULL,
        last_seen        INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE certificates (
        fingerprint TEXT PRIMARY KEY,
        host_id     INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        not_after   INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX certificates_host ON certificates(host_id);
    CREATE TABLE keys (
        key_id       TEXT PRIMARY KEY,
        host_id      INTEGER NOT NULL REFERENCES hosts(id) ON DELETE RESTRICT,
        pool_guid    TEXT NOT NULL,
        dataset_guid TEXT NOT NULL DEFAULT '',
        legacy_name  TEXT NOT NULL DEFAULT '',
        dataset      TEXT NOT NULL,
        keyformat    TEXT NOT NULL CHECK (keyformat IN ('raw', 'hex', 'passphrase')),
        state        TEXT NOT NULL CHECK (state IN ('pending', 'active', 'revoked')),
        origin       TEXT NOT NULL CHECK (origin IN ('generated', 'imported')),
        sealed       BLOB NOT NULL,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        CHECK ((dataset_guid = '') <> (legacy_name = ''))
    ) STRICT;
    -- One key per dataset, whatever its state: a revoked key is kept, never replaced.
    CREATE UNIQUE INDEX keys_dataset ON keys(host_id, pool_guid, dataset_guid)
        WHERE dataset_guid <> '';
    CREATE UNIQUE INDEX keys_legacy ON keys(host_id, pool_guid, legacy_name)
        WHERE legacy_name <> '';
    """,
    # A host's keys (key list --host, host remove and its foreign-key check) were found by
    # scanning every key: the unique indexes above are partial, so no query by host alone
    # can use them.
    """
    CREATE INDEX keys_host ON keys(host_id);
    """,
    # Facts about the data directory itself: init seals a check value under the master
    # key here, so that serve and the commands that seal can refuse a wrong master key.
    """
    CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) STRICT;
    """,
    # Dataset key rotation: a dataset's current key (pending, active or revoked) may have a
    # 'next' key beside it, and keys a rotation replaced stay 'retired' for a grace period.
    # SQLite cannot change a CHECK, so the table is made again; every lookup of a dataset's
    # keys, whatever their state, goes through keys_ref.
    """
    CREATE TABLE keys_rotating (
        key_id           TEXT PRIMARY KEY,
        host_id          INTEGER NOT NULL REFERENCES hosts(id) ON DELETE RESTRICT,
        pool_guid        TEXT NOT NULL,
        dataset_guid     TEXT NOT NULL DEFAULT '',
        legacy_name      TEXT NOT NULL DEFAULT '',
        dataset          TEXT NOT NULL,
        keyformat        TEXT NOT NULL CHECK (keyformat IN ('raw', 'hex', 'passphrase')),
        state            TEXT NOT NULL
            CHECK (state IN ('pending', 'active', 'revoked', 'next', 'retired')),
        origin           TEXT NOT NULL CHECK (origin IN ('generated', 'imported')),
        sealed           BLOB NOT NULL,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL,
        rotate_requested INTEGER NOT NULL DEFAULT 0 CHECK (rotate_requested IN (0, 1)),
        CHECK ((dataset_guid = '') <> (legacy_name = ''))
    ) STRICT;
    INSERT INTO keys_rotating (key_id, host_id, pool_guid, dataset_guid, legacy_name, dataset,
        keyformat, state, origin, sealed, created_at, updated_at)
        SELECT key_id, host_id, pool_guid, dataset_guid, legacy_name, dataset, keyformat,
            state, origin, sealed, created_at, updated_at FROM keys ORDER BY rowid;
    DROP TABLE keys;
    ALTER TABLE keys_rotating RENAME TO keys;
    CREATE UNIQUE INDEX keys_dataset ON keys(host_id, pool_guid, dataset_guid)
        WHERE dataset_guid <> '' AND state IN ('pending', 'active', 'revoked');
    CREATE UNIQUE INDEX keys_dataset_next ON keys(host_id, pool_guid, dataset_guid)
        WHERE dataset_guid <> '' AND state = 'next';
    CREATE UNIQUE INDEX keys_legacy ON keys(host_id, pool_guid, legacy_name)
        WHERE legacy_name <> '';
    CREATE INDEX keys_ref ON keys(host_id, pool_guid, dataset_guid);
    CREATE INDEX keys_host ON keys(host_id);
    """,
    # Rollovers. What each host's last check-in said: the pins it holds (its agent.toml's
    # and those it learned and put into its initramfs; kept when a check-in says none),
    # and the key id of the CA that issued the certificate it used, so that `tls status`
    # and `ca status` can tell who an activation would lock out. A certificate renewed by
    # its host
    # (`zfs-unlock-agent renew`): the new one names the one it replaces, which stays valid
    # until the new one is first used (then it is deleted) or until retire_at (0: never).
    """
    CREATE TABLE host_reports (
        host_id     INTEGER PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
        pins        TEXT,
        issuer      TEXT NOT NULL,
        reported_at INTEGER NOT NULL
    ) STRICT;
    ALTER TABLE certificates ADD COLUMN replaces TEXT NOT NULL DEFAULT '';
    ALTER TABLE certificates ADD COLUMN retire_at INTEGER NOT NULL DEFAULT 0;
    """,
    # Approval of releases (approval.py): policies of hosts and of their datasets
    # ('' '' is the host's own), the requests waiting for a person, the hosts whose
    # silence condition tripped, and the admins whose certificates the approval page
    # accepts. Requests are working state: closed ones are deleted
    # after a while; the audit log keeps every decision.
    """
    CREATE TABLE approval_policies (
        host_id      INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        pool_guid    TEXT NOT NULL DEFAULT '',
        dataset_guid TEXT NOT NULL DEFAULT '',
        policy       TEXT NOT NULL,
        PRIMARY KEY (host_id, pool_guid, dataset_guid)
    ) STRICT;
    CREATE TABLE approvals (
        id         TEXT PRIMARY KEY,
        host_id    INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        cert_fp    TEXT NOT NULL,
        nonce      TEXT NOT NULL,
        datasets   TEXT NOT NULL,
        source_ip  TEXT NOT NULL,
        reasons    TEXT NOT NULL,
        state      TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied', 'released')),
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        decided_by TEXT NOT NULL DEFAULT '',
        decided_at INTEGER NOT NULL DEFAULT 0,
        note       TEXT NOT NULL DEFAULT '',
        UNIQUE (host_id, cert_fp, nonce)
    ) STRICT;
    CREATE INDEX approvals_host ON approvals(host_id, state);
    CREATE TABLE silence_trips (
        host_id    INTEGER PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
        silent_for INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE admins (
        name        TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL UNIQUE,
        not_after   INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    ) STRICT;
    """,
)


# The same rows as SQLite's, plus what one SQLite server keeps elsewhere: the audit trail
# (a file beside SQLite) and the rate-limit buckets (a file per server), so that any node
# can answer any host. Buckets are UNLOGGED: losing them in a crash only refills them.
POSTGRESQL: tuple[str, ...] = (
    """
    CREATE TABLE hosts (
        id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name             TEXT NOT NULL UNIQUE,
        machine_id       TEXT NOT NULL UNIQUE,
        allowed_networks TEXT NOT NULL DEFAULT '[]',
        pools            TEXT NOT NULL DEFAULT '[]',
        enabled          BOOLEAN NOT NULL DEFAULT true,
        disabled_reason  TEXT NOT NULL DEFAULT '',
        deadman_timeout  BIGINT CHECK (deadman_timeout IS NULL OR deadman_timeout >= 0),
        created_at       BIGINT NOT NULL,
        last_seen        BIGINT NOT NULL
    );
    CREATE TABLE certificates (
        seq         BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        fingerprint TEXT PRIMARY KEY,
        host_id     BIGINT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        not_after   BIGINT NOT NULL,
        created_at  BIGINT NOT NULL
    );
    CREATE INDEX certificates_host ON certificates(host_id);
    CREATE TABLE keys (
        seq          BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        key_id       TEXT PRIMARY KEY,
        host_id      BIGINT NOT NULL REFERENCES hosts(id) ON DELETE RESTRICT,
        pool_guid    TEXT NOT NULL,
        dataset_guid TEXT NOT NULL DEFAULT '',
        legacy_name  TEXT NOT NULL DEFAULT '',
        dataset      TEXT NOT NULL,
        keyformat    TEXT NOT NULL CHECK (keyformat IN ('raw', 'hex', 'passphrase')),
        state        TEXT NOT NULL CHECK (state IN ('pending', 'active', 'revoked')),
        origin       TEXT NOT NULL CHECK (origin IN ('generated', 'imported')),
        sealed       BYTEA NOT NULL,
        created_at   BIGINT NOT NULL,
        updated_at   BIGINT NOT NULL,
        CHECK ((dataset_guid = '') <> (legacy_name = ''))
    );
    CREATE UNIQUE INDEX keys_dataset ON keys(host_id, pool_guid, dataset_guid)
        WHERE dataset_guid <> '';
    CREATE UNIQUE INDEX keys_legacy ON keys(host_id, pool_guid, legacy_name)
        WHERE legacy_name <> '';
    CREATE INDEX keys_host ON keys(host_id);
    CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    CREATE TABLE audit (
        id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        record TEXT NOT NULL
    );
    CREATE INDEX audit_ts ON audit(ts);
    CREATE UNLOGGED TABLE rate_buckets (
        name    TEXT PRIMARY KEY,
        tokens  DOUBLE PRECISION NOT NULL,
        stamp   DOUBLE PRECISION NOT NULL,
        granted BOOLEAN NOT NULL
    );
    """,
    # Dataset key rotation, as SQLite's step 4.
    """
    ALTER TABLE keys DROP CONSTRAINT keys_state_check;
    ALTER TABLE keys ADD CONSTRAINT keys_state_check
        CHECK (state IN ('pending', 'active', 'revoked', 'next', 'retired'));
    ALTER TABLE keys ADD COLUMN rotate_requested BOOLEAN NOT NULL DEFAULT false;
    DROP INDEX keys_dataset;
    CREATE UNIQUE INDEX keys_dataset ON keys(host_id, pool_guid, dataset_guid)
        WHERE dataset_guid <> '' AND state IN ('pending', 'active', 'revoked');
    CREATE UNIQUE INDEX keys_dataset_next ON keys(host_id, pool_guid, dataset_guid)
        WHERE dataset_guid <> '' AND state = 'next';
    CREATE INDEX keys_ref ON keys(host_id, pool_guid, dataset_guid);
    """,
    # Rollovers, as SQLite's step 5.
    """
    CREATE TABLE host_reports (
        host_id     BIGINT PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
        pins        TEXT,
        issuer      TEXT NOT NULL,
        reported_at BIGINT NOT NULL
    );
    ALTER TABLE certificates ADD COLUMN replaces TEXT NOT NULL DEFAULT '';
    ALTER TABLE certificates ADD COLUMN retire_at BIGINT NOT NULL DEFAULT 0;
    """,
    # Approval of releases, as SQLite's step 6.
    """
    CREATE TABLE approval_policies (
        host_id      BIGINT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        pool_guid    TEXT NOT NULL DEFAULT '',
        dataset_guid TEXT NOT NULL DEFAULT '',
        policy       TEXT NOT NULL,
        PRIMARY KEY (host_id, pool_guid, dataset_guid)
    );
    CREATE TABLE approvals (
        id         TEXT PRIMARY KEY,
        host_id    BIGINT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        cert_fp    TEXT NOT NULL,
        nonce      TEXT NOT NULL,
        datasets   TEXT NOT NULL,
        source_ip  TEXT NOT NULL,
        reasons    TEXT NOT NULL,
        state      TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied', 'released')),
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        decided_by TEXT NOT NULL DEFAULT '',
        decided_at BIGINT NOT NULL DEFAULT 0,
        note       TEXT NOT NULL DEFAULT '',
        UNIQUE (host_id, cert_fp, nonce)
    );
    CREATE INDEX approvals_host ON approvals(host_id, state);
    CREATE TABLE silence_trips (
        host_id    BIGINT PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
        silent_for BIGINT NOT NULL
    );
    CREATE TABLE admins (
        name        TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL UNIQUE,
        not_after   BIGINT NOT NULL,
        created_at  BIGINT NOT NULL
    );
    """,
)


def statements(step: str) -> list[str]:
    """A step's statements, one by one (no step has a semicolon inside a statement)."""
    return [s.strip() for s in step.split(";") if s.strip()]


def check_version(found: int, steps: tuple[str, ...], where: str) -> None:
    """Refuse a database at any version but the newest of STEPS."""
    current = len(steps)
    if found > current:
        raise SchemaMismatch(
            f"{where}: database schema {found} is newer than this server's ({current});"
            " run the newer server, or restore a backup made for this one"
        )
    if found < current:
        raise SchemaMismatch(
            f"{where}: database schema {found} is older than this server's ({current});"
            " run 'zfs-unlock-server migrate' first"
        )
