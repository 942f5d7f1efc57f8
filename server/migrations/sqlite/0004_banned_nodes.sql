-- A ban is a state of its own that no other write can clear: updates of a node's record
-- refuse a banned row (issue 19: a renewal or re-attestation in flight when the ban landed
-- would otherwise write the agent back). Evicting the agent (deleting the row) lifts it.
ALTER TABLE attested_nodes ADD COLUMN banned INTEGER NOT NULL DEFAULT 0;
-- Nodes banned before this column existed: both serial numbers empty.
UPDATE attested_nodes SET banned = 1
    WHERE json_extract(data, '$.serial_number') = ''
      AND json_extract(data, '$.new_serial_number') = '';
