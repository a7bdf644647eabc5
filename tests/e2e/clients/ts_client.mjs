// A real TypeScript-SDK client (@modelcontextprotocol/client 2.x) for tests/e2e/test_eras.py.
//
//   node ts_client.mjs SPEC_JSON
//
// SPEC_JSON: {"url": "http://127.0.0.1:PORT/mcp",
//             "mode": "2026-07-28" | "auto" | "legacy",      (versionNegotiation: {pin} | 'auto' | 'legacy')
//             "calls": [{"name": TOOL, "arguments": {...}, "progress": true|false}, ...],
//             "elicit": {...content answered to every elicitation/create (only the keys its schema has)...},
//             "sample": "text answered to every sampling/createMessage",
//             "model": "model name answered with the sampling text",
//             "timeoutMs": 20000}
// The package is resolved from $HARNESS_DIR/node_modules (default: ../../../target/harness).
//
// Prints exactly one JSON line on stdout:
//   {"ok": true, "protocolVersion": "...", "era": "modern"|"legacy", "tools": [names],
//    "results": [{"name": TOOL, "result": CallToolResult} | {"name": TOOL, "error": "..."}],
//    "elicitations": [params...], "samplings": [params...], "progress": {TOOL: [{progress,total,message}...]}}
// or {"ok": false, "stage": "connect"|"listTools", "error": "..."} when it could not get that far.
// A failing tool call does not stop the later calls; its error is recorded in "results".
// The handlers are registered with setRequestHandler: the SDK uses the same handlers for 2025 server->client
// requests and for the embedded inputRequests of a 2026-07-28 `input_required` result (auto-fulfil).

import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const harness = process.env.HARNESS_DIR || path.resolve(here, '../../../target/harness');
const require = createRequire(path.join(harness, 'package.json'));
const pkgEntry = require.resolve('@modelcontextprotocol/client');
// the package's "import" entry is dist/index.mjs beside the "require" one
const { Client, StreamableHTTPClientTransport } = await import(pathToFileURL(pkgEntry.replace(/\.cjs$/, '.mjs')).href);

const spec = JSON.parse(process.argv[2]);
const out = { ok: false, elicitations: [], samplings: [], progress: {}, results: [] };

function errText(e) {
    if (!e) return String(e);
    const parts = [e.name, e.code !== undefined ? `code=${e.code}` : '', e.message];
    if (e.data !== undefined) parts.push(`data=${JSON.stringify(e.data)}`);
    if (e.cause) parts.push(`cause=${errText(e.cause)}`);
    return parts.filter(Boolean).join(' ');
}

function finish(code) {
    process.stdout.write(JSON.stringify(out) + '\n', () => process.exit(code));
}

const negotiation = spec.mode === 'legacy' ? { mode: 'legacy' } : spec.mode === 'auto' ? { mode: 'auto' } : { mode: { pin: spec.mode } };
const client = new Client(
    { name: 'e2e-ts-eras', version: '1.0.0' },
    { capabilities: { elicitation: { form: {} }, sampling: {} }, versionNegotiation: negotiation }
);

client.setRequestHandler('elicitation/create', async request => {
    out.elicitations.push(request.params);
    const props = request.params.requestedSchema?.properties || {};
    const content = Object.fromEntries(Object.entries(spec.elicit).filter(([k]) => k in props));
    return { action: 'accept', content };
});
client.setRequestHandler('sampling/createMessage', async request => {
    out.samplings.push(request.params);
    return { role: 'assistant', model: spec.model, stopReason: 'endTurn', content: { type: 'text', text: spec.sample } };
});

const timeout = spec.timeoutMs || 20000;
const transport = new StreamableHTTPClientTransport(new URL(spec.url));
try {
    await client.connect(transport, { timeout });
} catch (e) {
    out.stage = 'connect';
    out.error = errText(e);
    finish(1);
}
if (out.stage === undefined) {
    out.protocolVersion = client.getNegotiatedProtocolVersion();
    out.era = client.getProtocolEra();
    try {
        out.tools = (await client.listTools(undefined, { timeout })).tools.map(t => t.name);
    } catch (e) {
        out.stage = 'listTools';
        out.error = errText(e);
    }
    if (out.stage === undefined) {
        for (const call of spec.calls) {
            const log = (out.progress[call.name] = []);
            const options = { timeout };
            if (call.progress) options.onprogress = p => log.push({ progress: p.progress, total: p.total, message: p.message });
            try {
                const result = await client.callTool({ name: call.name, arguments: call.arguments || {} }, options);
                out.results.push({ name: call.name, result });
            } catch (e) {
                out.results.push({ name: call.name, error: errText(e) });
            }
        }
        out.ok = true;
    }
    try {
        await client.close();
    } catch {
        // closing is best effort: the result is already recorded
    }
    finish(out.ok ? 0 : 1);
}
