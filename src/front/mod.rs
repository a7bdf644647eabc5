//! What downstream MCP clients talk to: the Streamable HTTP endpoint and the stdio server, both
//! adapting MCP requests onto the [`crate::broker::Broker`] through [`mcp::Front`].

pub mod approvals;
mod cluster;
mod forward;
pub mod http;
mod lane;
pub mod mcp;
mod oauth;
pub mod relay;
mod resume;
pub mod tls;
pub mod tokens;
