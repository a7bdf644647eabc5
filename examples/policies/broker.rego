# An OPA Rego policy for mcp-broker's [policy_engine]: the seeds' example, unchanged in shape.
# Evaluated after the [[policy]] rules: it decides what no rule covers and can refuse what a rule
# allowed. Input: {caller: {sub, client_id, scopes, groups, act, claims, authenticated},
#                  server, kind ("tool"|"prompt"|"resource"), name, arguments (null for lists)}.
package mcp.broker

import rego.v1

default decision := {"allowed": true}

decision := {"allowed": false, "message": "PII access requires the pii:read scope."} if {
	input.server == "ledger"
	input.name == "get_customer_pii"
	not "pii:read" in input.caller.scopes
}

decision := {"allowed": false, "message": "The audit log requires the audit:read scope."} if {
	input.server == "ledger"
	input.name == "get_audit_log"
	not "audit:read" in input.caller.scopes
}

# Arguments are visible on calls: large status changes need a second scope.
decision := {"allowed": false, "message": "Closing an account requires the ledger:close scope."} if {
	input.name == "update_account_status"
	input.arguments.status == "closed"
	not "ledger:close" in input.caller.scopes
}
