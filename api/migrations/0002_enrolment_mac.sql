-- Enrolment tokens remember the MAC address that PXE booted, so a token is good only for the
-- machine that has that NIC.
ALTER TABLE tokens ADD COLUMN mac TEXT;
