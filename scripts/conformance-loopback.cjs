// Preloaded (node --require) by scripts/conformance.sh and tests/e2e/test_conformance_next.py, not
// part of the reference server: binds every listening socket that names no host to 127.0.0.1 and
// announces the bound address on stdout ("conformance-ref listening on http://127.0.0.1:PORT/mcp"),
// so the server can run on PORT=0 without reaching beyond loopback.
'use strict';
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' || (typeof args[0] === 'string' && /^\d+$/.test(args[0]))) {
    if (typeof args[1] !== 'string') args.splice(1, 0, '127.0.0.1');
  }
  this.once('listening', () => {
    const a = this.address();
    if (a && typeof a === 'object') process.stdout.write(`conformance-ref listening on http://127.0.0.1:${a.port}/mcp\n`);
  });
  return listen.apply(this, args);
};
