//! Guardrails (`[guard]`): secrets masked in results ([`mask`]), tool definitions pinned against
//! change ([`pins`]), descriptions scanned for injected instructions ([`scan`]). Pure functions over
//! JSON and files; the broker's pipeline and catalog call them.

pub mod mask;
pub mod pins;
pub mod scan;
