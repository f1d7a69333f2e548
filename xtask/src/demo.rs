pub fn demo() -> anyhow::Result<()> {
    Ok(())
}
