//! `flake.lock` pins the commit `flake.nix` names, so a pin moved in one file and not the
//! other fails here rather than in a newcomer's first shell. The narHash is the one public
//! lock files of nixos-25.11 at that commit record; nothing here computes it (no Nix).

use std::path::Path;

#[test]
fn flake_lock_pins_the_commit_flake_nix_names() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("flake.lock")).unwrap()).unwrap();
    let flake = std::fs::read_to_string(root.join("flake.nix")).unwrap();
    assert_eq!(lock["version"], 7);
    assert_eq!(lock["root"], "root");
    assert_eq!(lock["nodes"]["root"]["inputs"]["nixpkgs"], "nixpkgs");
    let nixpkgs = &lock["nodes"]["nixpkgs"];
    let rev = nixpkgs["locked"]["rev"].as_str().unwrap();
    assert_eq!(nixpkgs["original"]["rev"], rev);
    assert_eq!(nixpkgs["locked"]["type"], "github");
    assert!(
        flake.contains(&format!(
            "inputs.nixpkgs.url = \"github:NixOS/nixpkgs/{rev}\";"
        )),
        "flake.nix does not name the locked commit {rev}: run `nix flake lock` after moving the pin"
    );
    if rev == "8fd9daa3db09ced9700431c5b7ad0e8ba199b575" {
        assert_eq!(
            nixpkgs["locked"]["narHash"],
            "sha256-Ti+ZBvW6yrWWAg2szExVTwCd4qOJ3KlVr1tFHfyfi8Q="
        );
        assert_eq!(nixpkgs["locked"]["lastModified"], 1778430510);
    }
}
