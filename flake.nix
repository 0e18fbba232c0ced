{
  description = "hashpool-harness: real pool, mint, auditor, proxy and Lightning roles on a private chain, driven by Gherkin scenarios";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # Build-time tools: protoc for cdk's gRPC, cmake/pkg-config for -sys crates.
      buildTools = pkgs: with pkgs; [ pkg-config protobuf cmake ];
    in
    {
      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = (buildTools pkgs) ++ (with pkgs; [
            rustc
            cargo
            clippy
            rustfmt
            rust-analyzer
            cargo-nextest
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
            echo "hashpool-harness dev shell: bitcoind $(bitcoind -version | head -n1 | awk '{print $NF}'), redis $(redis-server --version | awk '{print $3}'), lightningd $(lightningd --version)"
            echo "run: just test   (or: just up, just --list)"
          '';
        };
      });

      packages = forAllSystems (pkgs: {
        default = pkgs.rustPlatform.buildRustPackage {
          pname = "hashpool-harness";
          version = "0.1.0";
          src = ./.;
          cargoLock.lockFile = ./Cargo.lock;
          nativeBuildInputs = buildTools pkgs;
          PROTOC = "${pkgs.protobuf}/bin/protoc";
          # The scenarios start real processes (bitcoind, Redis): run them with `just test` in
          # the dev shell, not inside the sandboxed build.
          doCheck = false;
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
