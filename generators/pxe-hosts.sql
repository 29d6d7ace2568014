-- SPDX-License-Identifier: GPL-2.0-or-later
-- The host table that generators/pxe reads by default (PXE_FORMAT=sqlite or
-- postgresql). The same file works for both:
--   python3 -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).executescript(open(sys.argv[2]).read())' /var/lib/atftpd/pxe-hosts.db generators/pxe-hosts.sql
--   psql -X -v ON_ERROR_STOP=1 -d inventory -f generators/pxe-hosts.sql
-- One row per host; a column is an inventory key (see generators/README.md),
-- NULL or '' = unset. Add pxelinux_kernel, grub_append, ipxe_kernel, ...
-- columns (text) for per-loader overrides if you need them.
CREATE TABLE pxe_hosts (
    mac        text PRIMARY KEY,   -- lower case aa:bb:cc:dd:ee:ff
    hostname   text,
    ip         text,               -- a.b.c.d, for PXE_HEXIP
    kernel     text NOT NULL,
    initrd     text,               -- comma-separated
    append     text,
    ipappend   integer,
    timeout    integer,            -- tenths of a second
    serial     text,
    ui         text,
    menu_title text
);
-- For example:
-- INSERT INTO pxe_hosts (mac, hostname, ip, kernel, initrd, append, timeout)
--     VALUES ('52:54:00:12:34:56', 'web1', '192.168.1.20', 'debian-installer/amd64/linux',
--             'debian-installer/amd64/initrd.gz',
--             'auto=true priority=critical url=http://192.168.1.1/d-i/web1.cfg', 30);
