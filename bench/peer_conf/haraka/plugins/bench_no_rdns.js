// bench_no_rdns: answer Haraka's per-connection reverse DNS lookup locally. The bench runs on
// loopback with no DNS of its own; without this, every connection would ask the machine's resolver
// for the PTR of 127.0.0.1 (the other peers make no DNS lookups either).
'use strict'

exports.hook_lookup_rdns = function (next, connection) {
    next(OK, 'localhost')
}
