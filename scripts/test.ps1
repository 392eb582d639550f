# Set up (if needed) and run the test suite: scripts/test for Windows. Needs Mosquitto answering on
# 127.0.0.1:1883 (installed from mosquitto.org; its installer registers the "mosquitto" service).
# Extra arguments go to pytest, e.g. scripts\test.ps1 tests\conversion -x
# NOT RUN HERE: the project's CI has no Windows machine (see the README's Windows quick start).
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

function Test-Broker {
    $client = New-Object System.Net.Sockets.TcpClient
    try { $client.Connect('127.0.0.1', 1883); return $true } catch { return $false } finally { $client.Dispose() }
}

$SavedPath = $env:PATH
Push-Location (Split-Path -Parent $PSScriptRoot)
try {
    & "$PSScriptRoot\setup.ps1"
    $MosquittoDir = Join-Path $env:ProgramFiles 'mosquitto'
    if ((Test-Path $MosquittoDir) -and -not (Get-Command mosquitto_pub -ErrorAction SilentlyContinue)) {
        $env:PATH = "$MosquittoDir;$env:PATH"  # the tests run mosquitto and mosquitto_pub
    }
    if (-not (Test-Broker) -and (Get-Service -Name mosquitto -ErrorAction SilentlyContinue)) {
        Write-Host 'test: starting the mosquitto service'
        Start-Service -Name mosquitto  # needs an administrator shell
        for ($i = 0; $i -lt 50 -and -not (Test-Broker); $i++) { Start-Sleep -Milliseconds 100 }
    }
    if (-not (Test-Broker)) {
        throw 'test: no MQTT broker on 127.0.0.1:1883: install Mosquitto from https://mosquitto.org/download/ and start its service (Start-Service mosquitto, as administrator)'
    }
    & .venv\Scripts\python.exe -m pytest @args
    $Code = $LASTEXITCODE
} finally {
    Pop-Location
    $env:PATH = $SavedPath
}
exit $Code
