{
  description = "hashpool-harness: real pool, mint, auditor, proxy and Lightning roles on a private chain, driven by Gherkin scenarios";

  # One commit of the nixos-25.11 release branch (2026-05-10): every `nix develop` gets the
  # same rustc, clippy, bitcoind, lightningd and Redis (the shell prints their versions; rustc
  # must be at least the workspace's rust-version, 1.88). To move it: pick a newer commit of a release branch, replace the hash below, run
  # `nix flake lock` (it records the new narHash in flake.lock), then `just lint` and `just test`
  # in the new shell; a new bitcoind gets its own chain cache automatically.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/8fd9daa3db09ced9700431c5b7ad0e8ba199b575";

  outputs =
    { self, nixpkgs }:
    let
      # The harness drives Linux processes (process groups, /proc, PR_SET_PDEATHSIG).
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # Build-time tools: protoc for cdk's gRPC, cmake/pkg-config for -sys crates.
      buildTools =
        pkgs: with pkgs; [
          pkg-config
          protobuf
          cmake
        ];
      # The workspace built with the pinned rustc; `doCheck` selects whether its unit tests run.
      workspace =
        pkgs: doCheck:
        pkgs.rustPlatform.buildRustPackage {
          pname = "hashpool-harness";
          version = "0.1.0";
          src = ./.;
          cargoLock.lockFile = ./Cargo.lock;
          nativeBuildInputs = buildTools pkgs;
          PROTOC = "${pkgs.protobuf}/bin/protoc";
          inherit doCheck;
          # Unit tests only: the scenarios' runner (`test = false` in scenarios/Cargo.toml) starts
          # real bitcoind, Redis and lightningd processes and runs with `just test` in the dev
          # shell, not inside the sandboxed build.
          cargoTestFlags = [ "--workspace" ];
          preCheck = ''
            export HOME=$TMPDIR
          '';
        };
    in
    {
      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages =
            (buildTools pkgs)
            ++ (with pkgs; [
              rustc
              cargo
              clippy
              rustfmt
              rust-analyzer
              just
              bitcoind
              clightning
              redis
              python3
            ]);
          PROTOC = "${pkgs.protobuf}/bin/protoc";
          # The harness looks at these first (then PATH, then the ci/bootstrap cache).
          BITCOIND_EXE = "${pkgs.bitcoind}/bin/bitcoind";
          BITCOIN_CLI_EXE = "${pkgs.bitcoind}/bin/bitcoin-cli";
          LIGHTNINGD_EXE = "${pkgs.clightning}/bin/lightningd";
          REDIS_SERVER_EXE = "${pkgs.redis}/bin/redis-server";
          RUST_SRC_PATH = "${pkgs.rustPlatform.rustLibSrc}";
          shellHook = ''
            echo "hashpool-harness dev shell: rustc $(rustc --version | awk '{print $2}'), bitcoind $(bitcoind -version | head -n1 | awk '{print $NF}'), redis $(redis-server --version | awk '{print $3}'), lightningd $(lightningd --version)"
            echo "run: just test   (or: just up, just --list)"
          '';
        };
      });

      packages = forAllSystems (pkgs: {
        default = workspace pkgs false;
      });

      # `nix flake check`: the workspace's unit tests (not the scenarios).
      checks = forAllSystems (pkgs: {
        unit-tests = workspace pkgs true;
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt);
    };
}
