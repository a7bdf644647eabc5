fn main() -> std::process::ExitCode {
    mcp_broker::cli::main()
}
