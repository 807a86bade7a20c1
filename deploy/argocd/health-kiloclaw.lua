-- Argo CD resource health for kiloclaw.kilo.ai/KiloClawInstance.
-- Install: the argocd-cm key resource.customizations.health.kiloclaw.kilo.ai_KiloClawInstance
-- (argocd-cm-snippet.yaml carries this file verbatim; a test keeps the two identical).
-- The status follows kstatus (Ready / Reconciling / Stalled, observedGeneration), so the mapping is:
--   no status yet, or the current generation not yet acted on  -> Progressing
--   Stalled=True (failed recovery, spec Fly rejects, bad token) -> Degraded
--   phase Failed                                                -> Degraded
--   stopped on purpose (spec.state Stopped) and Ready           -> Suspended
--   Ready=True                                                  -> Healthy
--   anything else (busy phases, Reconciling=True, waiting)      -> Progressing
local hs = {}

local function condition(status, conditionType)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

local function isTrue(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  if c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local busyPhases = {
  Pending = true,
  Provisioning = true,
  Starting = true,
  Stopping = true,
  Recovering = true,
  Destroying = true,
}

local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if status == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for operator"
  return hs
end

local phase = status.phase or ""
local ready = condition(status, "Ready")
local reconciling = condition(status, "Reconciling")
local stalled = condition(status, "Stalled")

if isTrue(stalled) then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(ready, "Failed")
  return hs
end

local desired = (obj.spec and obj.spec.state) or "Running"
if desired == "Stopped" and phase == "Stopped" and isTrue(ready) then
  hs.status = "Suspended"
  hs.message = "Stopped (spec.state: Stopped)"
  return hs
end

if isTrue(ready) then
  hs.status = "Healthy"
  if status.region ~= nil and status.machineId ~= nil then
    hs.message = phase .. " in " .. status.region .. " (machine " .. status.machineId .. ")"
  else
    hs.message = describe(ready, phase)
  end
  return hs
end

hs.status = "Progressing"
if isTrue(reconciling) then
  hs.message = describe(reconciling, phase)
elseif busyPhases[phase] then
  hs.message = phase
elseif phase ~= "" then
  hs.message = describe(ready, phase)
else
  hs.message = "Waiting for operator"
end
return hs
