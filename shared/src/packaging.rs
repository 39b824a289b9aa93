//! What `make install` installs besides the binaries, generated from each binary's own
//! command line (so that it cannot drift from it): man pages (clap_mangen), one for the
//! command and one per subcommand (`cdp-agent-run.1`), and shell completions for bash, zsh
//! and fish (clap_complete). Each binary writes them with its hidden `generate --out DIR`.

use std::io;
use std::path::Path;

use clap_complete::Shell;

/// Writes `DIR/man/man1/NAME.1`, `DIR/man/man1/NAME-SUB.1` for every visible subcommand, and
/// `DIR/completions/{NAME.bash,_NAME,NAME.fish}`.
pub fn generate(mut cmd: clap::Command, out: &Path) -> io::Result<()> {
    let name = cmd.get_name().to_owned();
    let man = out.join("man").join("man1");
    std::fs::create_dir_all(&man)?;
    cmd.build();
    write_man(&cmd, &man.join(format!("{name}.1")))?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let page = format!("{name}-{}", sub.get_name());
        let sub = sub.clone().name(page.clone());
        write_man(&sub, &man.join(format!("{page}.1")))?;
    }
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let mut f = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut cmd, &name, &mut f);
    }
    Ok(())
}

fn write_man(cmd: &clap::Command, path: &Path) -> io::Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    std::fs::write(path, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_cover_every_visible_subcommand() {
        let cmd = clap::Command::new("tool")
            .about("a tool")
            .subcommand(clap::Command::new("run").about("run it"))
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = tempfile::tempdir().expect("tempdir");
        generate(cmd, dir.path()).expect("generate");
        let man = dir.path().join("man/man1");
        let page = std::fs::read_to_string(man.join("tool-run.1")).expect("page");
        assert!(page.contains("run it"), "{page}");
        assert!(man.join("tool.1").exists());
        assert!(
            !man.join("tool-secret.1").exists(),
            "hidden commands get no page"
        );
        for f in ["tool.bash", "_tool", "tool.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(f))
                .expect("completion");
            assert!(text.contains("run"), "{f}: {text}");
        }
    }
}
