# Set up (if needed) and run the main job: scripts/demo for Windows. The live runtime serves all agents
# over MQTT against a market simulation. No broker? An embedded one starts on loopback. No checkpoints?
# A small population is trained first. Extra arguments go to `blockmarket demo` (see --help); Ctrl-C
# stops it cleanly (the simulator prints its final summary), a second Ctrl-C at once.
# NOT RUN HERE: the project's CI has no Windows machine (see the README's Windows quick start).
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
Push-Location (Split-Path -Parent $PSScriptRoot)
try {
    & "$PSScriptRoot\setup.ps1"
    & .venv\Scripts\blockmarket.exe demo @args
    $Code = $LASTEXITCODE
} finally {
    Pop-Location
}
exit $Code
