# Create .venv (if needed) and install the project with its dev extras: scripts/setup for Windows.
# torch is pinned through constraints.txt to 2.13.0, and a CUDA build is refused.
# NOT RUN HERE: the project's CI has no Windows machine (see the README's Windows quick start).
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

function Invoke-Native([string]$Exe, [string[]]$Arguments) {
    & $Exe @Arguments
    if ($LASTEXITCODE -ne 0) { throw "setup: $Exe $($Arguments -join ' ') failed (exit code $LASTEXITCODE)" }
}

Push-Location (Split-Path -Parent $PSScriptRoot)
try {
    $Python = '.venv\Scripts\python.exe'
    if (-not (Test-Path $Python)) {
        # The Python launcher picks 3.11; $env:PYTHON names another interpreter (C:\Python312\python.exe).
        if ($env:PYTHON) { $Base = $env:PYTHON; $BaseArgs = @() } else { $Base = 'py'; $BaseArgs = @('-3.11') }
        Write-Host "setup: creating .venv with $(& $Base @BaseArgs --version)"
        Invoke-Native $Base ($BaseArgs + @('-m', 'venv', '.venv'))
    }
    $Stamp = '.venv\.blockmarket-installed'
    $Stale = -not (Test-Path $Stamp)
    if (-not $Stale) {
        $Installed = (Get-Item $Stamp).LastWriteTime
        $Newer = @(Get-Item pyproject.toml, constraints.txt | Where-Object { $_.LastWriteTime -gt $Installed })
        $Stale = $Newer.Count -gt 0
    }
    if ($Stale) {
        Write-Host 'setup: installing blockmarket[dev] (torch pinned by constraints.txt)'
        Invoke-Native $Python @('-m', 'pip', 'install', '-q', '--upgrade', 'pip')
        $Saved = @{ PIP_CONSTRAINT = $env:PIP_CONSTRAINT; PYTHONWARNINGS = $env:PYTHONWARNINGS }
        try {
            $env:PIP_CONSTRAINT = 'constraints.txt'
            $env:PYTHONWARNINGS = 'ignore'  # setuptools' editable-install advice
            Invoke-Native $Python @('-m', 'pip', 'install', '-q', '-c', 'constraints.txt', '-e', '.[dev]')
        } finally {
            $env:PIP_CONSTRAINT = $Saved.PIP_CONSTRAINT
            $env:PYTHONWARNINGS = $Saved.PYTHONWARNINGS
        }
        Invoke-Native $Python @('-c', "import sys, torch; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') and torch.version.cuda is None else f'setup: wrong torch build {v}')")
        Set-Content -Path $Stamp -Value (Get-Date -Format o)
    }
} finally {
    Pop-Location
}
