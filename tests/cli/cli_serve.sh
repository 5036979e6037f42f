#!/usr/bin/env bash
# The serving commands' argument checks, without a cluster: a client with nothing to do, an
# admin command without the secret, a worker or coordinator that cannot get one, and a
# listen address whose port is out of range.
#   cli_serve.sh MLASERVE
mlaserve=$1
source "$(dirname "$0")/cli_test_lib.sh"
unset MLASERVE_CONTROL_SECRET

run client
expect_error "client with nothing to do"
expect_output "nothing to do" "client with nothing to do"
expect_output "--prompt-ids" "client with nothing to do"

run admin workers
expect_error "admin without a secret"
expect_output "MLASERVE_CONTROL_SECRET" "admin without a secret"

run admin
expect_error "admin without a subcommand"

run coordinator --address 127.0.0.1:0 --control-address 127.0.0.1:0
expect_error "coordinator without a secret"
expect_output "MLASERVE_CONTROL_SECRET" "coordinator without a secret"

export MLASERVE_CONTROL_SECRET=short
run coordinator --address 127.0.0.1:0 --control-address 127.0.0.1:0
expect_error "coordinator with a short secret"
expect_output "at least 16" "coordinator with a short secret"

export MLASERVE_CONTROL_SECRET=cli-serve-test-secret-value
run coordinator --address 127.0.0.1:99999 --control-address 127.0.0.1:0
expect_error "port out of range"
expect_output "127.0.0.1:99999" "port out of range"
run coordinator --address 127.0.0.1:50999 --control-address 127.0.0.1:50999
expect_error "one address for both planes"
expect_output "control plane" "one address for both planes"
run worker --model /nonexistent-model-dir --group -1
expect_error "negative group"
finish
